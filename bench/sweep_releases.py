"""Drive sglang releases' own allocators with `swa-canary check` and tabulate what each breaks.

    python -m bench.sweep_releases --releases 0.4.9,0.5.8,0.5.23 --budget 60 --out sweep.md

For each release: build (once, cached under --envs) an environment layered on the running
one (its torch and this project) with `.ci/install-sglang --version V`; read the target's
capabilities and contract there; run `check --target sglang` twice, under the whole SPEC
(`--relax all`) and under the release's scheduler contract; write one Markdown table row per
run, listing every finding of its `--json` report (a `findings` list, or the single `finding`).
Exit 0 when every run completed (findings or not), 2 when a release could not be set up or
checked (its row says why).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ENVS = Path.home() / ".cache" / "swa-canary" / "envs"
RUNS = (("whole SPEC", ["--relax", "all"]), ("its contract", []))
DESCRIBE = """
import json
from properties.targets import resolve_target
target = resolve_target("sglang")
print(json.dumps({"missing": target.capabilities.missing(), "restrictions": target.contract.restrictions()}))
"""


class SweepError(RuntimeError):
    """A release whose environment could not be built or whose check could not run."""


@dataclass
class Run:
    name: str
    findings: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    error: str = ""


@dataclass
class Release:
    version: str
    setup_seconds: float = 0.0
    missing: list[str] = field(default_factory=list)
    restrictions: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    error: str = ""


def _tail(text: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def environment(version: str, envs: Path) -> Path:
    """The Python of release `version`'s environment, built if missing."""
    env = envs / f"sglang-{version}"
    python = env / "bin" / "python"
    marker = env / ".swa-canary-ready"
    if marker.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True, capture_output=True)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # Layered on the running environment: its torch and this project, without reinstalling them.
    parent = sysconfig.get_paths()["purelib"]
    Path(purelib, "_swa_canary_parent.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    done = subprocess.run(
        [str(REPO / ".ci" / "install-sglang"), "--version", version, str(python)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SweepError(f"install-sglang failed: {_tail(done.stderr or done.stdout)}")
    marker.touch()
    return python


def describe(python: Path) -> dict:
    done = subprocess.run([str(python), "-W", "ignore", "-c", DESCRIBE], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SweepError(f"the sglang target does not resolve: {_tail(done.stderr)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def findings_of(report: dict) -> list[dict]:
    """Every finding of a check's JSON report: a `findings` list, or the single `finding`."""
    if isinstance(report.get("findings"), list):
        return report["findings"]
    return [report["finding"]] if report.get("finding") else []


def check(python: Path, name: str, extra: list[str], budget: float, seed: int, out: Path) -> Run:
    report_path = out / f"{name.replace(' ', '-')}.json"
    command = [str(python), "-W", "ignore", "-m", "properties.cli", "check", "--target", "sglang",
               "--budget", str(budget), "--seed", str(seed), "--json", str(report_path), *extra]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    run = Run(name, seconds=time.monotonic() - started)
    if done.returncode not in (0, 1) or not report_path.exists():
        run.error = f"exit {done.returncode}: {_tail(done.stderr)}"
        return run
    report = json.loads(report_path.read_text())
    run.findings, run.steps = findings_of(report), report.get("steps", 0)
    return run


def sweep_release(version: str, envs: Path, budget: float, seed: int, out: Path) -> Release:
    release = Release(version)
    started = time.monotonic()
    try:
        python = environment(version, envs)
        described = describe(python)
    except (SweepError, subprocess.CalledProcessError) as error:
        release.error = str(error)
        return release
    release.setup_seconds = time.monotonic() - started
    release.missing, release.restrictions = described["missing"], described["restrictions"]
    folder = out / version
    folder.mkdir(parents=True, exist_ok=True)
    release.runs = [check(python, name, extra, budget, seed, folder) for name, extra in RUNS]
    return release


def _finding_cell(finding: dict) -> str:
    detail = finding.get("detail", "").split("; ")[0].replace("|", "/")[:110]
    return (f"{finding['severity']} {finding['invariant']} ({finding.get('machine', '?')}, "
            f"{finding.get('program_steps', '?')} steps, found in {finding.get('seconds', 0):.1f} s): {detail}")


def table(releases: list[Release], budget: float, seed: int) -> str:
    lines = [
        f"Budget {budget:g} s per run, seed {seed}, CPU. Steps: rules in the shrunk program; found in: "
        "seconds into the check (shrinking not included).",
        "",
        "| release | cannot be called with | run | findings | steps run | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for release in releases:
        if release.error:
            lines.append(f"| {release.version} | | (not run) | {release.error} | | |")
            continue
        missing = ", ".join(release.missing) or "—"
        for run in release.runs:
            restrictions = ", ".join(release.restrictions) or "none"
            label = run.name if run.name == "whole SPEC" else f"its contract ({restrictions})"
            found = run.error or "<br>".join(_finding_cell(f) for f in run.findings) or "none"
            lines.append(f"| {release.version} | {missing} | {label} | {found} | {run.steps} | {run.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_releases", description=__doc__.splitlines()[0])
    parser.add_argument("--releases", required=True, help="comma-separated sglang release numbers, e.g. 0.4.9,0.5.23")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per check run (default 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--envs", type=Path, default=DEFAULT_ENVS, help=f"environment cache (default {DEFAULT_ENVS})")
    parser.add_argument("--out", type=Path, default=Path("sweep.md"), help="the Markdown table (reports beside it)")
    args = parser.parse_args(argv)
    versions = [v.strip() for v in args.releases.split(",") if v.strip()]
    if not versions or args.budget <= 0:
        parser.error("give at least one release and a positive budget")
    reports = args.out.with_suffix("")
    args.envs.mkdir(parents=True, exist_ok=True)
    releases = []
    for version in versions:
        release = sweep_release(version, args.envs, args.budget, args.seed, reports)
        releases.append(release)
        print(f"{version}: {release.error or ', '.join(str(len(r.findings)) + ' finding(s)' for r in release.runs)}",
              file=sys.stderr)
        args.out.write_text(table(releases, args.budget, args.seed))
    failed = any(r.error or any(run.error for run in r.runs) for r in releases)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
