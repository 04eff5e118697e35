"""Every bad command-line input is one line on stderr and exit status 2, before any run starts.

Each case runs `swa-canary` in this process (a traceback would fail the test) from an empty
scratch directory holding whatever the case needs, and checks the exit status, that stderr is
one line naming the problem, that nothing went to stdout, and that no file in the scratch
directory was written, changed or removed. Ctrl-C is checked on a real process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from allocator import SWATokenToKVPoolAllocator
from canary.probes import AllocatorView
from canary.snapshot import Snapshot
from properties.cli import EXIT_INTERRUPTED, EXIT_USAGE, main
from properties.runners.export import REPORT_NAME

REPO = Path(__file__).resolve().parent.parent
HAS_SGLANG = importlib.util.find_spec("sglang") is not None
HAS_CUDA = torch.cuda.is_available()


# ------------------------------------------------------------ set-ups
def a_file(name: str, content: bytes = b"x") -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes(content)


def a_directory(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).mkdir()


def a_snapshot(root: Path, name: str = "snap.pt") -> Path:
    allocator = SWATokenToKVPoolAllocator(16, 16, 1, torch.float16, "cpu")
    allocator.alloc(3)
    view = AllocatorView.of(allocator)
    return Snapshot.capture(view, None, window=None, page_size=1, step=3, monitor="m").save(root / name)


def a_bit_flipped_snapshot(root: Path) -> None:
    path = a_snapshot(root)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x10
    path.write_bytes(bytes(data))


def a_foreign_torch_file(root: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, root / "model.pt")


def a_finding(edit: Callable[[dict], None] = lambda report: None, test: bool = True) -> Callable[[Path], None]:
    """A finding directory (finding/) whose report.json `edit` changed."""

    def build(root: Path) -> None:
        directory = root / "finding"
        directory.mkdir()
        report = {"id": "stale-0123456789", "kind": "violation", "target": "reference", "device": "cpu",
                  "invariant": "STALE", "severity": "GUARD", "machine": "SlotMachine", "test": "test_stale.py"}
        edit(report)
        (directory / REPORT_NAME).write_text(json.dumps(report))
        if test:
            (directory / "test_stale.py").write_text("def test_stale():\n    assert False\n")

    return build


def without(key: str) -> Callable[[dict], None]:
    return lambda report: report.pop(key)


def with_value(key: str, value: object) -> Callable[[dict], None]:
    return lambda report: report.update({key: value})


def a_finding_file(text: str) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        (root / "finding").mkdir()
        (root / "finding" / REPORT_NAME).write_text(text)

    return build


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    message: str
    """A part of the one line the command must print (case-sensitive)."""
    setup: Callable[[Path], None] | None = None
    skip: str | None = None


def case(
    name: str, argv: str, message: str, setup: Callable[[Path], None] | None = None, skip: str | None = None
) -> Case:
    return Case(name, tuple(argv.split()), message, setup, skip)


NO_SGLANG = "sglang is installed" if HAS_SGLANG else None
NO_CUDA = "a CUDA device exists" if HAS_CUDA else None

CASES = [
    # output paths, checked before the budget is spent
    case("check-json-missing-dir", "check --budget 1 --json /nonexistent/dir/x.json", "'/nonexistent/dir' does not exist"),
    case("check-json-is-a-dir", "check --budget 1 --json adir", "is a directory", a_directory("adir")),
    case("check-json-under-a-file", "check --budget 1 --json afile/x.json", "is not a directory", a_file("afile")),
    case("check-json-under-dev-null", "check --budget 1 --json /dev/null/x.json", "is not a directory"),
    case("check-json-in-proc", "check --budget 1 --json /proc/x.json", "cannot write in '/proc'"),
    case("check-json-empty", "check --budget 1 --json=", "the path is empty"),
    case("selfcheck-json-missing-dir", "selfcheck --budget 1 --json /nonexistent/x.json", "does not exist"),
    case("selfcheck-json-under-dev-null", "selfcheck --budget 1 --json /dev/null/x", "is not a directory"),
    case("fuzz-out-under-dev-null", "fuzz --duration 1 --out /dev/null/x", "not a directory"),
    case("fuzz-out-in-proc", "fuzz --duration 1 --out /proc/x", "cannot write in '/proc'"),
    case("fuzz-out-is-a-file", "fuzz --duration 1 --out afile", "not a directory", a_file("afile")),
    case("fuzz-out-under-a-file", "fuzz --duration 1 --out afile/out", "not a directory", a_file("afile")),
    case("fuzz-out-empty", "fuzz --duration 1 --out=", "the path is empty"),
    # example databases
    case("fuzz-db-port-not-a-number", "fuzz --duration 1 --db redis://127.0.0.1:notaport/0", "notaport"),
    case("fuzz-db-port-out-of-range", "fuzz --duration 1 --db redis://127.0.0.1:99999/0", "out of range"),
    case("fuzz-db-not-a-number", "fuzz --duration 1 --db redis://host:6379/abc", "'abc' is not a number"),
    case("fuzz-db-no-host", "fuzz --duration 1 --db redis://:6379/0", "no host"),
    case("fuzz-db-unix-no-path", "fuzz --duration 1 --db unix://", "needs a socket path"),
    case("fuzz-db-http", "fuzz --duration 1 --db http://example.com/db", "not a Redis URL"),
    case("fuzz-db-under-dev-null", "fuzz --duration 1 --db /dev/null/db", "not a directory"),
    case("fuzz-db-is-a-file", "fuzz --duration 1 --db afile", "not a directory", a_file("afile")),
    case("fuzz-db-empty", "fuzz --duration 1 --db=", "the path is empty"),
    # targets that cannot be imported or built
    case("check-sglang-missing", "check --budget 1 --target sglang", "sglang's SWA allocator is not importable", skip=NO_SGLANG),
    case("fuzz-sglang-missing", "fuzz --duration 1 --target sglang", "not importable", skip=NO_SGLANG),
    case("against-sglang-missing", "check --budget 1 --against sglang", "not importable", skip=NO_SGLANG),
    case("target-getcwd", "check --budget 1 --target os:getcwd", "cannot build an allocator: TypeError"),
    case("target-a-class", "check --budget 1 --target allocator:SWATokenToKVPoolAllocator", "cannot build an allocator"),
    case("target-returns-none", "check --budget 1 --target bad_targets:returns_none", "built a NoneType, not an SWA allocator"),
    case("target-returns-a-dict", "check --budget 1 --target bad_targets:returns_a_dict", "it has no alloc"),
    case("target-half-an-allocator", "check --budget 1 --target bad_targets:HalfAnAllocator", "it has no alloc, alloc_extend"),
    case("target-raises", "check --budget 1 --target bad_targets:raises", "RuntimeError: no allocator today"),
    case("target-not-callable", "check --budget 1 --target bad_targets:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
    case("target-missing-attribute", "check --budget 1 --target os:no_such_factory", "has no callable"),
    case("target-missing-module", "check --budget 1 --target no_such_module_anywhere:f", "cannot import target module"),
    case("target-module-raises", "check --budget 1 --target bad_target_module:f", "RuntimeError: this module cannot be imported"),
    case("target-no-colon", "check --budget 1 --target justaname", "neither"),
    case("target-empty-factory", "check --budget 1 --target os:", "neither"),
    case("against-getcwd", "check --budget 1 --against os:getcwd", "cannot build an allocator"),
    case("fuzz-target-getcwd", "fuzz --duration 1 --target os:getcwd", "cannot build an allocator"),
    case("device-cuda-without-gpu", "check --budget 1 --device cuda", "no CUDA device", skip=NO_CUDA),
    case("selfcheck-cuda-without-gpu", "selfcheck --budget 1 --device cuda", "no CUDA device", skip=NO_CUDA),
    case("simulate-cuda-without-gpu", "simulate --device cuda", "no CUDA device", skip=NO_CUDA),
    # numbers out of range
    *[case(f"check-budget-{text}", f"check --budget {text}", "argument --budget") for text in
      ("-5", "0", "nan", "1e400", "inf", "-inf", "abc", "5x", "0s", "-1m")],
    case("check-budget-empty", "check --budget=", "argument --budget"),
    case("check-budget-missing", "check --budget", "expected one argument"),
    case("check-seed-negative", "check --seed -1", "argument --seed"),
    case("check-seed-too-large", "check --seed 4294967296", "a seed must be in"),
    case("check-seed-not-a-number", "check --seed one", "not an integer"),
    case("check-interval-zero", "check --interval 0", "argument --interval"),
    case("check-device-tpu", "check --device tpu", "invalid choice: 'tpu'"),
    case("check-relax-unknown", "check --relax nope", "invalid choice: 'nope'"),
    case("check-restrict-all", "check --restrict all", "invalid choice: 'all'"),
    case("check-unknown-option", "check --nope", "unrecognized arguments: --nope"),
    case("unknown-command", "nope", "invalid choice: 'nope'"),
    case("fuzz-workers-zero", "fuzz --workers 0", "must be at least 1"),
    case("fuzz-workers-negative", "fuzz --workers -3", "must be at least 1"),
    case("fuzz-workers-not-a-number", "fuzz --workers many", "not an integer"),
    case("fuzz-duration-zero", "fuzz --duration 0", "argument --duration"),
    case("fuzz-duration-nan", "fuzz --duration nan", "argument --duration"),
    case("fuzz-examples-zero", "fuzz --examples-per-run 0", "must be at least 1"),
    case("fuzz-machine-unknown", "fuzz --machine Nope", "invalid choice: 'Nope'"),
    case("fuzz-interval-negative", "fuzz --interval -1", "argument --interval"),
    case("selfcheck-mutant-unknown", "selfcheck --mutant nope", "invalid choice: 'nope'"),
    case("selfcheck-budget-zero", "selfcheck --budget 0", "argument --budget"),
    case("simulate-steps-zero", "simulate --steps 0", "must be at least 1"),
    case("simulate-page-size-zero", "simulate --page-size 0", "must be at least 1"),
    case("simulate-size-not-multiple", "simulate --page-size 4 --size-swa 1022", "not a multiple of page_size"),
    case("simulate-inject-unknown", "simulate --inject NOPE", "invalid choice: 'NOPE'"),
    case("simulate-window-zero", "simulate --window 0", "must be at least 1"),
    # snapshots
    case("replay-missing", "replay nothing-here.pt", "no such file or directory"),
    case("replay-garbage", "replay garbage.pt", "is not a canary snapshot", a_file("garbage.pt", b"not a torch file")),
    case("replay-empty-file", "replay empty.pt", "is not a canary snapshot", a_file("empty.pt", b"")),
    case("replay-bit-flipped-snapshot", "replay snap.pt", "snap.pt", a_bit_flipped_snapshot),
    case("replay-foreign-torch-file", "replay model.pt", "keys", a_foreign_torch_file),
    # findings
    case("replay-empty-directory", "replay adir", "is not a finding directory", a_directory("adir")),
    case("replay-report-not-json", "replay finding", "is not a finding directory", a_finding_file("{not json")),
    case("replay-report-a-list", "replay finding", "not a JSON object", a_finding_file("[1, 2]")),
    case("replay-finding-without-target", "replay finding", "needs target", a_finding(without("target"))),
    case("replay-finding-without-test", "replay finding", "needs test", a_finding(without("test"))),
    case("replay-finding-kind-edited", "replay finding", "kind 'bug' is none of", a_finding(with_value("kind", "bug"))),
    case("replay-crash-without-seed", "replay finding", "needs seed, pass", a_finding(with_value("kind", "crash"))),
    case("replay-finding-test-missing", "replay finding", "test file 'test_stale.py' is missing", a_finding(test=False)),
    case("replay-finding-target-unimportable", "replay finding", "cannot import target module",
         a_finding(with_value("target", "no_such_module_anywhere:f"))),
    case("replay-finding-target-unbuildable", "replay finding", "cannot build an allocator",
         a_finding(with_value("target", "os:getcwd"))),
]


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under `root` with its mode and a digest of its content."""
    state = {}
    for path in sorted(root.rglob("*")):
        mode = oct(path.stat().st_mode)
        digest = None if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        state[str(path.relative_to(root))] = mode if digest is None else f"{mode} {digest}"
    return state


@pytest.mark.parametrize("bad", CASES, ids=[bad.name for bad in CASES])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(
    bad: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if bad.skip:
        pytest.skip(bad.skip)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWA_TARGET", raising=False)
    if bad.setup is not None:
        bad.setup(tmp_path)
    before = tree(tmp_path)
    try:
        status = main(list(bad.argv))
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    out, err = capsys.readouterr()
    assert status == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert bad.message in lines[0]
    assert out == ""
    assert tree(tmp_path) == before, "a rejected command must write, change or remove nothing"


def test_a_bit_flipped_snapshot_is_named_as_damaged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = a_snapshot(tmp_path)
    assert main(["replay", str(path)]) == 0
    data = bytearray(path.read_bytes())
    payload = data.index(b"swa-canary-snapshot", data.index(b"swa-canary-snapshot") + 1)  # the saved state's own header
    data[payload + 200] ^= 0x01
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["replay", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "the digest does not match" in err and "weights_only" not in err


def test_garbage_is_not_given_torchs_weights_only_advice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage")
    assert main(["replay", str(tmp_path / "garbage.pt")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "is not a canary snapshot" in err and "weights_only" not in err


def test_help_lists_the_exit_codes_and_imports_no_torch() -> None:
    code = (
        "import sys\nfrom properties.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.stdout.strip().endswith("NO-TORCH")
    for status in ("0 ", "1 ", "2 ", "130 "):
        assert f"\n  {status}" in completed.stdout
    assert completed.stderr == ""


def test_a_command_prints_no_numpy_warning(tmp_path: Path) -> None:
    completed = subprocess.run([sys.executable, "-m", "properties.cli", "check", "--budget", "nan"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == EXIT_USAGE and completed.stderr.count("\n") == 1
    completed = subprocess.run([sys.executable, "-m", "properties.cli", "replay", str(tmp_path / "x.pt")], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == EXIT_USAGE and "NumPy" not in completed.stderr and completed.stderr.count("\n") == 1


def test_ctrl_c_stops_a_check_within_2s_with_a_summary_and_its_json(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    check = subprocess.Popen(
        [sys.executable, "-m", "properties.cli", "check", "--budget", "60", "--interval", "0.2", "--json", str(report)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        first = json.loads(next(line for line in check.stderr if line.startswith("{")))  # off a terminal: JSON lines
        assert first["event"] == "status" and first["budget"] == 60.0
        sent = time.monotonic()
        check.send_signal(signal.SIGINT)
        lines = [json.loads(line) for line in check.stderr if line.startswith("{")]
        summary_seconds = time.monotonic() - sent
        out = check.stdout.read()
        check.wait(timeout=30)
    finally:
        check.kill()
    assert summary_seconds < 2.0
    assert check.returncode == EXIT_INTERRUPTED
    assert lines[-1]["event"] == "summary" and lines[-1]["interrupted"] is True
    assert all(line["event"] == "status" for line in lines[:-1])
    assert out.startswith("interrupted, no violation:") and len(out.splitlines()) == 1
    written = json.loads(report.read_text())
    assert written["interrupted"] is True and written["finding"] is None and written["programs"] > 0



def interrupted_on_third_build(turn_into: Callable[[], None]) -> Callable:
    """A reference target that sends itself Ctrl-C while building its third allocator, inside
    code that swallows the KeyboardInterrupt or turns it into another error, as Hypothesis's
    garbage-collector callback and its internal assertions do."""
    from properties.targets import as_target

    built = []

    def factory(config: object) -> object:
        built.append(1)
        if len(built) == 3:
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                turn_into()
        return as_target("reference").factory(config)

    return factory


def assertion_error() -> None:
    raise AssertionError


@pytest.mark.parametrize("turn_into", [lambda: None, assertion_error], ids=["swallowed", "as-assertion-error"])
def test_ctrl_c_stops_a_check_even_when_its_interrupt_is_swallowed_and_is_no_finding(turn_into) -> None:
    from properties.runners.check import run_check
    from properties.targets import Target

    target = Target("interrupted", interrupted_on_third_build(turn_into))
    started = time.monotonic()
    report = run_check(target, budget=30, seed=0, machines=["SlotMachine"])
    assert report.interrupted and report.finding is None
    assert time.monotonic() - started < 10
