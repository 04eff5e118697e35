"""`swa-canary check`: run every machine against a target until a time budget is spent.

The machines run in rounds of short Hypothesis runs, each with a fresh seed drawn from one
master seed, so `--seed` repeats a whole check. A violation is shrunk by Hypothesis and
reported with its invariant, severity, time to detect, minimal program and that program as
plain allocator calls. By default the check stops there; with `every_finding` it masks the
finding (properties/machines/masking.py says what "the same finding" is) and goes on until
the budget is spent, reporting every distinct finding, FATAL first.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TextIO

from hypothesis import Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.stateful import run_state_machine_as_test

from canary.invariants import INVARIANTS, InvariantViolation, Name, Severity
from properties.machines import AllocatorMachine, machine_classes
from properties.machines.masking import FindingKey, FindingMask, detail_shape, error_keys
from properties.runners.snippet import snippet_of
from properties.settings import PROFILES
from properties.targets import Factory, Target, as_target
from properties.targets.isolated import TargetHung
from properties.targets.workers import IsolationError

EXAMPLES_PER_RUN = 8
SHRINKING_STEPS_PER_PROGRAM = 15
"""Rules per program at most in a check that shrinks (the ci profile's 40 otherwise). Shrinking
takes time in proportion to the failing program's length, and every mutant of the catalogue
fails within 8 rules: over the catalogue the minimal program comes 3-5x sooner (BENCHMARKS.md).
Every distinct failure is shrunk (report_multiple_bugs), so that a crash found on the way never
stands in for an invariant violation."""


@dataclass
class Stats:
    """Shared by every machine instance of one check: what has been exercised so far."""

    programs: int = 0
    steps: int = 0
    calls: Counter = field(default_factory=Counter)
    last_program: dict | None = None
    """Config and call log of the latest program; after a failure, the minimal one, which
    Hypothesis replays last."""


@dataclass
class Finding:
    machine: str
    invariant: Name
    severity: str
    detail: str
    program: str
    program_steps: int
    seed: int
    seconds: float
    """Time to detect: from the start of the check to the first failing step of its run,
    before shrinking (to the report, where the run saw no failing step)."""
    calls: dict | None = None
    """The minimal program as allocator calls: {"config": ..., "calls": [{"call", "args"}...]}."""
    invariants: list[Name] = field(default_factory=list)
    """Every invariant the reported step broke, most severe first (["CRASH"] for a crash)."""
    call: str = ""
    """The allocator call of the step that broke it."""
    keys: list[FindingKey] = field(default_factory=list)
    """Its identity: the key of every violation of that step, the reported one first
    (properties/machines/masking.py)."""
    follows: list[FindingKey] = field(default_factory=list)
    """Masked findings its minimal program goes past before it breaks (empty: it stands alone)."""
    reported_seconds: float = 0.0
    """From the start of the check to the shrunk report."""
    snippet: str = ""
    """The minimal program as a standalone allocator-call snippet (properties/runners/snippet.py)."""

    @property
    def key(self) -> FindingKey:
        """The reported violation's identity."""
        return self.keys[0] if self.keys else (self.invariant, self.call, detail_shape(self.detail))

    def explain(self) -> str:
        text = (
            f"{self.severity} {self.invariant} in {self.machine} at {self.call or 'a step'}, detected after "
            f"{self.seconds:.1f}s (seed {self.seed}):\n  {self.detail}\n"
        )
        if self.follows:
            passed = "; ".join(f"{invariant} at {call}" for invariant, call, _ in self.follows)
            text += f"  after going past: {passed}\n"
        text += f"Minimal program ({self.program_steps} steps):\n{self.program}"
        if self.snippet:
            text += f"\nAs allocator calls:\n{self.snippet}"
        return text


@dataclass
class CheckReport:
    target: str
    device: str
    seed: int
    budget: float
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    """CPU time this process spent on the check: beside `seconds` (wall), what a loaded
    machine does not inflate."""
    programs: int = 0
    steps: int = 0
    runs: int = 0
    findings: list[Finding] = field(default_factory=list)
    """Every distinct finding, most severe first, then in the order found."""
    coverage: dict | None = None
    """With --coverage: properties.runners.coverage.CoverageReport, as a dict."""
    interrupted: bool = False
    """Stopped by Ctrl-C (SIGINT) before the budget was spent."""

    @property
    def finding(self) -> Finding | None:
        """The first of `findings` (the worst), or None."""
        return self.findings[0] if self.findings else None

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)
        self.findings.sort(key=lambda found: found.severity != Severity.FATAL.value)

    def to_json(self) -> dict:
        """Every field; `finding` (the worst one, as before `findings` existed) and `findings`."""
        report = asdict(self)
        report["finding"] = report["findings"][0] if self.findings else None
        return report


def program_of(error: BaseException) -> str:
    """The minimal program Hypothesis attached to a failure, as Python (`state = ...` through
    `state.teardown()`)."""
    lines = "\n".join(getattr(error, "__notes__", ())).splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("state = ")), None)
    if start is None:
        return "\n".join(lines)
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("state.teardown()")), len(lines) - 1)
    return "\n".join(lines[start : end + 1])


def rule_steps(program: str) -> int:
    """Rules in a printed program: not the constructor, the per-step check or the teardown."""
    skipped = ("state = ", "state.allocator_matches_model()", "state.teardown()", "state.setup(")
    return sum(1 for line in program.splitlines() if "state." in line and not line.strip().startswith(skipped))


def failures_of(error: BaseException) -> list[BaseException]:
    """Each distinct failure Hypothesis reported (the leaves of an exception group)."""
    parts = getattr(error, "exceptions", None)
    if not parts:
        return [error]
    return [failure for part in parts for failure in failures_of(part)]


def most_telling(error: BaseException) -> BaseException:
    """Of the distinct failures Hypothesis may report together (an exception group), the one
    to report: an invariant violation, FATAL first, before a crash."""
    failures = [most_telling(part) for part in getattr(error, "exceptions", ())]
    if not failures:
        return error
    violations = [failure for failure in failures if isinstance(failure, InvariantViolation)]
    if violations:
        return min(violations, key=lambda failure: failure.severity is not Severity.FATAL)
    return failures[0]


def finding_from(machine: str, error: BaseException, run_seed: int, seconds: float) -> Finding:
    error = most_telling(error)
    program = program_of(error)
    steps = rule_steps(program)
    if isinstance(error, InvariantViolation):
        first = error.violations[0]
        invariant, severity = first.invariant, first.severity.value
        detail = "; ".join(v.explain() for v in error.violations)
        fired = list(dict.fromkeys(v.invariant for v in error.violations))
    else:  # the target raised, its process died (CRASH), or a call never returned (HANG)
        invariant = Name.HANG if isinstance(error, TargetHung) else Name.CRASH
        severity = INVARIANTS[invariant].severity.value
        detail = f"{type(error).__name__}: {error}"
        fired = [invariant]
    call = getattr(error, "allocator_call", "(outside a call)")
    return Finding(
        machine, invariant, severity, detail, program, steps, run_seed, seconds, invariants=fired, call=call,
        keys=error_keys(call, error), follows=list(getattr(error, "follows", ())), reported_seconds=seconds,
        calls=getattr(error, "program_calls", None),
    )


def run_finding(
    name: str, error: BaseException, run_seed: int, started: float, mask: FindingMask, stats: Stats
) -> Finding:
    """The finding of a failed run of machine `name` (under `mask`, into `stats`): timed from
    `started` to its first failing step, with its minimal program's calls."""
    finding = finding_from(name, error, run_seed, time.monotonic() - started)
    if mask.first_failure_at is not None:
        finding.seconds = mask.first_failure_at - started
    if finding.calls is None:
        finding.calls = stats.last_program
    return finding


def bind(machine: type[AllocatorMachine], stats: Stats, mask: FindingMask | None = None) -> type[AllocatorMachine]:
    """`machine` reporting into `stats`, with `mask`'s findings masked."""
    return type(machine.__name__, (machine,), {"stats": stats, "finding_mask": mask})


@dataclass
class Search:
    """What one check has found so far, and how its next run masks it."""

    target: Target
    device: str
    started: float
    every_finding: bool
    masked: set[FindingKey] = field(default_factory=set)
    retired: set[str] = field(default_factory=set)
    """Machines that found again a finding they cannot mask (an error outside any call)."""

    def run(
        self, machine: type[AllocatorMachine], name: str, run_seed: int, stats: Stats, run_settings: settings
    ) -> list[Finding]:
        """One Hypothesis run; its new findings (every distinct failure it reported, or with
        `every_finding` off the most telling one)."""
        mask = FindingMask(frozenset(self.masked))
        try:
            run_state_machine_as_test(hypothesis_seed(run_seed)(bind(machine, stats, mask)), settings=run_settings)
        except IsolationError:  # the worker machinery failed, not the target
            raise
        except Exception as error:  # any failure of the target is a finding, not a harness crash
            failures = failures_of(error) if self.every_finding else [most_telling(error)]
            found = [run_finding(name, failure, run_seed, self.started, mask, stats) for failure in failures]
            new = [finding for finding in found if not set(finding.keys) <= self.masked]
            if not new:
                self.retired.add(name)
            for finding in new:
                self.masked.update(finding.keys)
                finding.snippet = snippet_of(finding, self.target, self.device)
            return new
        return []


def check_phases(shrink: bool = True) -> list[Phase]:
    """Every phase but explain (it replays each shrunk program under a line tracer, 2.4-3.5x
    slower, to print which lines ran; our findings name the call instead), and shrink only
    when asked."""
    return [phase for phase in Phase if phase is not Phase.explain and (shrink or phase is not Phase.shrink)]


def run_check(
    target: str | Factory | Target = "reference",
    device: str = "cpu",
    budget: float = 60.0,
    seed: int | None = None,
    machines: list[str] | None = None,
    progress: Callable[[CheckReport], None] | None = None,
    shrink: bool = True,
    max_steps: int | None = None,
    every_finding: bool = False,
) -> CheckReport:
    """Run the machines round-robin until the budget; return what happened.

    By default the check stops at its first finding. every_finding=True goes on until the
    budget is spent, each finding masked once reported (properties/machines/masking.py), and
    reports every distinct one. shrink=False reports each failing program as found: its
    program is then not minimal (shrinking usually takes far longer than detecting).
    max_steps bounds the rules of a program (default: SHRINKING_STEPS_PER_PROGRAM when shrinking,
    else the ci profile's); shorter programs shrink in fewer replays, which matters when each
    failing replay waits out a call timeout (HANG)."""
    master = random.randrange(2**32) if seed is None else seed
    rng = random.Random(master)
    bound = as_target(target)
    classes = machine_classes(bound, device)
    names = machines or sorted(classes)
    stats = Stats()
    report = CheckReport(bound.name, device, master, budget)
    steps = max_steps or (SHRINKING_STEPS_PER_PROGRAM if shrink else PROFILES["ci"].stateful_step_count)
    run_settings = settings(
        PROFILES["ci"],
        max_examples=EXAMPLES_PER_RUN,
        derandomize=False,
        database=None,
        phases=check_phases(shrink),
        stateful_step_count=steps,
    )
    started, started_cpu = time.monotonic(), time.process_time()
    search = Search(bound, device, started, every_finding)

    def done() -> bool:
        enough = report.finding is not None and not every_finding
        return enough or report.seconds >= budget or len(search.retired) == len(names)

    try:
        with CtrlC() as ctrl_c:
            while not done():
                for name in names:
                    if name in search.retired:
                        continue
                    found = search.run(classes[name], name, rng.randrange(2**32), stats, run_settings)
                    if ctrl_c.pressed:  # its KeyboardInterrupt was swallowed, or surfaced as another error
                        raise KeyboardInterrupt
                    for finding in found:
                        report.add(finding)
                    report.runs += 1
                    _update(report, stats, started, started_cpu)
                    if progress is not None:
                        progress(report)
                    if done():
                        break
    except KeyboardInterrupt:  # Ctrl-C: stop here and report what the check did so far
        report.interrupted = True
        _update(report, stats, started, started_cpu)
    return report


class CtrlC:
    """While entered (in the main thread), Ctrl-C raises KeyboardInterrupt as usual and is also
    remembered in `pressed`. Python swallows the exception when the signal lands in a garbage
    collector callback (Hypothesis installs one), printing "Exception ignored", and landing in
    Hypothesis's own code it can surface as another error (an AssertionError); the check then
    sees `pressed` and stops, reporting no finding from that run."""

    def __init__(self) -> None:
        self.pressed = False
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *_: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, _number: int, _frame: object) -> None:
        self.pressed = True
        raise KeyboardInterrupt


def _update(report: CheckReport, stats: Stats, started: float, started_cpu: float) -> None:
    report.programs, report.steps = stats.programs, stats.steps
    report.seconds = time.monotonic() - started
    report.cpu_seconds = time.process_time() - started_cpu


def print_progress(
    stream: TextIO = sys.stderr, interval: float = 10.0, tty: bool | None = None
) -> Callable[[CheckReport], None]:
    """A progress callback for `run_check`: on a terminal one line redrawn in place every 2 s;
    elsewhere (a log, CI, a pipe) one JSON `status` line every `interval` seconds, as `fuzz`
    writes them.

    Args:
        stream: where to write.
        interval: seconds between JSON lines off a terminal.
        tty: whether `stream` is a terminal (default: ask it).
    Returns:
        The callback.
    """
    on_terminal = stream.isatty() if tty is None else tty
    every = TTY_REFRESH_SECONDS if on_terminal else interval
    last = [0.0]

    def show(report: CheckReport) -> None:
        if report.seconds - last[0] < every and report.finding is None:
            return
        last[0] = report.seconds
        if on_terminal:
            stream.write(f"\r{status_line(report)}")
        else:
            stream.write(json.dumps(status_record(report)) + "\n")
        stream.flush()

    return show


TTY_REFRESH_SECONDS = 2.0


def status_record(report: CheckReport, event: str = "status") -> dict:
    """What a check has done so far, as one JSON-ready record."""
    return {
        "event": event,
        "target": report.target,
        "elapsed": round(report.seconds, 1),
        "budget": report.budget,
        "programs": report.programs,
        "steps": report.steps,
        "steps_per_s": round(report.steps / report.seconds, 1) if report.seconds else 0.0,
        "finding": None if report.finding is None else report.finding.invariant,
        "interrupted": report.interrupted,
    }


def status_line(report: CheckReport) -> str:
    rate = report.steps / report.seconds if report.seconds else 0.0
    return (
        f"[{report.seconds:6.1f}s / {report.budget:.0f}s] {report.programs} programs, "
        f"{report.steps} steps ({rate:,.0f}/s)"
    )
