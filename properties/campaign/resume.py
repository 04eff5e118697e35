"""Re-running exported findings: at the start of a resumed campaign, and `swa-canary replay DIR`.

A violation or error finding re-runs its exported pytest file (in process for a campaign,
with pytest for `replay`); a crash finding re-runs its worker's run from the recorded seed.
A campaign checks its known findings in a child process, so a finding that still kills its
process cannot take the campaign down: the child is replaced and the check goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

from properties.campaign.database import DatabaseSpec
from properties.campaign.worker import DATABASE, PASS_NAMES, rerun
from properties.runners.export import REPORT_NAME, load_report, run_regression
from properties.targets import check_target_builds, isolated_spec, resolve_target
from properties.usage import UsageError

FAILS, PASSES, CRASHES = "fails", "passes", "crashes"


def verdict(directory: Path, target: str, device: str) -> tuple[str, str]:
    """(FAILS or PASSES, what failed) for one finding on `target`, in this process."""
    report = load_report(directory)
    if report["kind"] == "crash":
        database = DatabaseSpec(**report["database"]) if report["pass"] == PASS_NAMES[DATABASE] else None
        error = rerun(target, device, report["machine"], report["seed"], report["examples_per_run"], database)
        return (PASSES, "") if error is None else (FAILS, f"{type(error).__name__}: {error}")
    test = directory / report["test"]
    failure = run_regression(test.read_text(), str(test), resolve_target(target).factory, device)
    return (PASSES, "") if failure is None else (FAILS, failure)


def _check_in_child(directories: list[str], target: str, device: str, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.dup2(2, 1)
    for directory in directories:
        conn.send((directory, *verdict(Path(directory), target, device)))


def check_known(directories: list[Path], target: str, device: str) -> dict[str, tuple[str, str]]:
    """Verdict of every finding directory on `target`: FAILS, PASSES, or CRASHES (its check
    killed the process that ran it)."""
    context = multiprocessing.get_context("spawn")
    pending = [str(directory) for directory in directories]
    verdicts: dict[str, tuple[str, str]] = {}
    while pending:
        reader, writer = context.Pipe(duplex=False)
        child = context.Process(target=_check_in_child, args=(pending, target, device, writer), daemon=True)
        child.start()
        writer.close()
        while pending:
            try:
                directory, outcome, detail = reader.recv()
            except (EOFError, OSError):
                child.join()
                verdicts[pending.pop(0)] = (CRASHES, f"the process checking it exited with {child.exitcode}")
                break
            verdicts[directory] = (outcome, detail)
            pending.remove(directory)
        reader.close()
        child.join()
    return {Path(directory).name: verdicts[directory] for directory in map(str, directories)}


FINDING_KINDS = {"violation": ("test",), "error": ("test",), "crash": ("machine", "seed", "pass", "examples_per_run")}
"""The kinds of finding and the report keys each needs besides id, target, device and invariant."""


def checked_report(directory: Path) -> dict:
    """A finding's report.json, with every key its replay reads; UsageError otherwise.

    Args:
        directory: a finding directory (OUT/findings/<id>).
    Returns:
        The report.
    """
    try:
        report = load_report(directory)
    except (OSError, ValueError) as error:
        raise UsageError(f"{directory} is not a finding directory ({error})") from None
    if not isinstance(report, dict):
        raise UsageError(f"{directory}/{REPORT_NAME} is not a finding report (not a JSON object)")
    kind = report.get("kind")
    if kind not in FINDING_KINDS:
        raise UsageError(f"{directory}/{REPORT_NAME}: kind {kind!r} is none of {', '.join(FINDING_KINDS)}")
    missing = [key for key in ("id", "target", "device", "invariant", *FINDING_KINDS[kind]) if key not in report]
    if missing:
        raise UsageError(f"{directory}/{REPORT_NAME}: a {kind} finding needs {', '.join(missing)}")
    if kind != "crash" and not (directory / str(report["test"])).is_file():
        raise UsageError(f"{directory}: its test file {report['test']!r} is missing")
    return report


def replay_finding(directory: Path, target: str | None = None, isolate: bool = False) -> int:
    """`swa-canary replay DIR/findings/<id>`: 1 if the finding still fails on `target` (else
    SWA_TARGET, else its own target; isolate: in a worker process under this Python), and a
    crash finding only if its run still kills the process; 0 if it passes; UsageError if DIR
    is not a finding or its target cannot be imported or built."""
    report = checked_report(directory)
    target = target or os.environ.get("SWA_TARGET", str(report["target"]))
    if isolate:
        target = isolated_spec(target)
    device = os.environ.get("SWA_DEVICE", str(report["device"]))
    check_target_builds(resolve_target(target), device)
    print(f"finding {report['id']}: {report.get('severity', 'FATAL')} {report['invariant']} in "
          f"{report.get('machine', '?')}, on {target} ({device})")
    if report["kind"] == "crash":
        outcome, detail = check_known([directory], target, device)[directory.name]
        print({CRASHES: "still crashes", FAILS: "no longer crashes, but fails", PASSES: "passes"}[outcome]
              + (f": {detail}" if detail else ""))
        return {PASSES: 0, FAILS: 1, CRASHES: 1}[outcome]
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(directory), report["test"]
    ]
    completed = subprocess.run(command, cwd=directory, env={**os.environ, "SWA_TARGET": target, "SWA_DEVICE": device})
    return {0: 0, 1: 1}.get(completed.returncode, 2)
