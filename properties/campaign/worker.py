"""One campaign worker process: every machine in turn, fresh seeds, the shared database.

A worker alternates two kinds of run. A database pass (at start, then every
`reuse_seconds`) replays the stored failures of each machine, so known failures come back
first and failures other workers or campaigns stored reach this one. Search passes run each
machine with a fresh seed for a short `examples_per_run`, with shrinking, and store what fails.
A failure is exported (properties/runners/export.py) before the coordinator hears of it. A
search pass masks the findings this worker already reported (properties/machines/masking.py),
so it looks past them for other bugs; a database pass masks nothing.

Before each run the worker writes (machine, seed, pass) into shared memory: if the process
dies, the coordinator knows which run killed it. It ignores SIGINT: the coordinator stops it
through an event, checked between runs, and SIGUSR1, which interrupts a run (a long shrink).
Its stdout goes to stderr, so nothing it prints mixes with the coordinator's status lines.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
import unittest
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from hypothesis import Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.core import decode_failure
from hypothesis.database import ExampleDatabase, choices_to_bytes
from hypothesis.stateful import run_state_machine_as_test
from hypothesis.statistics import collector

from properties.campaign.database import DatabaseSpec
from properties.campaign.database import health as database_health
from properties.machines import AllocatorMachine, machine_classes
from properties.machines.masking import FindingKey, FindingMask
from properties.machines.reach import count_events
from properties.runners.check import Stats, bind, run_finding
from properties.runners.export import export_finding
from properties.runners.snippet import snippet_of
from properties.settings import PROFILES, prepare_process
from properties.targets import resolve_target

SEARCH, DATABASE = 0, 1
PASS_NAMES = {SEARCH: "search", DATABASE: "database"}
SEARCH_PHASES = (Phase.explicit, Phase.generate, Phase.target, Phase.shrink)
"""No explain phase: it replays the shrunk program under a line tracer (properties.runners.check)."""
DATABASE_PHASES = (Phase.reuse, Phase.shrink)


@dataclass(frozen=True)
class WorkerPlan:
    slot: int
    seed: int
    """Seeds every search run of this worker process."""
    target: str
    device: str
    database: DatabaseSpec
    findings_dir: str
    machines: tuple[str, ...]
    examples_per_run: int
    report_seconds: float
    reuse_seconds: float


def run_settings(database: ExampleDatabase | None, examples_per_run: int, which: int) -> settings:
    """The nightly profile, with short runs so workers report often."""
    return settings(
        PROFILES["nightly"],
        max_examples=examples_per_run,
        database=database,
        phases=DATABASE_PHASES if which == DATABASE else SEARCH_PHASES,
        derandomize=False,
        report_multiple_bugs=False,
    )


def run_machine(
    machine: type[AllocatorMachine],
    stats: Stats,
    run_seed: int,
    run: settings,
    on_statistics: Callable[[dict], None] = lambda _: None,
    mask: FindingMask | None = None,
) -> BaseException | None:
    """One Hypothesis run of a machine, with `mask`'s findings masked; the (shrunk) failure,
    or None."""
    stats.last_program = None
    try:
        with collector.with_value(on_statistics):  # type: ignore[arg-type]  # Hypothesis types the hook's default, None
            run_state_machine_as_test(hypothesis_seed(run_seed)(bind(machine, stats, mask)), settings=run)
    except unittest.SkipTest:  # a database pass with nothing stored for this machine
        return None
    except Exception as error:  # any failure of the target is a finding, not a worker crash
        return error
    return None


_SUB_KEYS = (b".secondary", b".pareto")
_BLOB = re.compile(r"@reproduce_failure\('[^']*', b'([^']*)'\)")


class RunDatabase(ExampleDatabase):
    """The campaign's database as one run sees it, remembering what the run saved under a
    primary key (the key Hypothesis treats as shrunk failures: replayed first, and reported
    without shrinking again when they still fail).

    A run leaves there failures it never reported: the last of each bug it slipped away from
    while shrinking another, and, when interrupted, the unshrunk failure it was shrinking. The
    next database pass, in this campaign or another sharing the database, would report one of
    those, unshrunk, instead of the finding. `settle` moves them to the secondary key, which a
    database pass replays after the primary one and shrinks."""

    def __init__(self, inner: ExampleDatabase) -> None:
        super().__init__()
        self.inner = inner
        self.saved: set[tuple[bytes, bytes]] = set()

    def __repr__(self) -> str:
        return f"RunDatabase({self.inner!r})"

    def save(self, key: bytes, value: bytes) -> None:
        self.inner.save(key, value)
        if not key.endswith(_SUB_KEYS):
            self.saved.add((key, value))

    def fetch(self, key: bytes) -> Iterable[bytes]:
        return self.inner.fetch(key)

    def delete(self, key: bytes, value: bytes) -> None:
        self.inner.delete(key, value)
        self.saved.discard((key, value))

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.inner.move(src, dest, value)
        self.saved.discard((src, value))
        if not dest.endswith(_SUB_KEYS):
            self.saved.add((dest, value))

    def settle(self, reported: bytes | None) -> None:
        """Move what the run saved under a primary key, but the failure it reported, to the
        secondary key.

        Args:
            reported: the reported failure's choices as stored (None: the run reported none).
        """
        for key, value in sorted(self.saved - {(key, reported) for key, _ in self.saved}):
            self.inner.move(key, key + b".secondary", value)
        self.saved.clear()


def reported_choices(error: BaseException) -> bytes | None:
    """The stored form of the failure Hypothesis reported with `error` (from the
    @reproduce_failure blob it prints under print_blob), or None if it printed none."""
    for note in getattr(error, "__notes__", ()):
        match = _BLOB.search(note)
        if match:
            return choices_to_bytes(decode_failure(match.group(1).encode()))
    return None


class Reporter:
    """Sends to the coordinator. A thread sends the progress made since the last report every
    `every` seconds, so a long shrink still shows steps. Counters are copied with one
    `dict.update` each, which the interpreter does without switching threads.

    If the coordinator is gone (killed: the pipe breaks, or this process is re-parented), the
    worker is `orphaned`: the thread interrupts the run in progress and the worker stops,
    instead of fuzzing on with no one to report to."""

    def __init__(
        self, conn: Connection, stats: Stats, events: Counter, every: float, database: Callable[[], dict] = dict
    ) -> None:
        self.conn, self.stats, self.events, self.every = conn, stats, events, every
        self.database = database
        self.lock = threading.Lock()
        self.sent: tuple[int, int, Counter[str], Counter[str]] = (0, 0, Counter(), Counter())
        self.parent = os.getppid()
        self.orphaned = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._report_periodically, daemon=True)
        self.thread.start()

    def send(self, message: dict) -> None:
        with self.lock:
            if self.orphaned:
                return
            try:
                self.conn.send(message)
            except OSError:
                self.orphaned = True

    def progress(self) -> dict:
        now = (self.stats.programs, self.stats.steps, Counter(self.stats.calls), Counter(self.events))
        programs, steps, calls, events = self.sent
        self.sent = now
        return {
            "type": "progress",
            "programs": now[0] - programs,
            "steps": now[1] - steps,
            "calls": dict(now[2] - calls),
            "events": dict(now[3] - events),
            "database": self.database(),
        }

    def _report_periodically(self) -> None:
        while not self.done.wait(self.every):
            if os.getppid() != self.parent:
                self.orphaned = True
            self.send(self.progress())
            if self.orphaned:
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.send(self.progress())
        self.send({"type": "stopped"})


class Interruptible:
    """SIGUSR1 (the coordinator stopping) interrupts a run in progress; Hypothesis then stops
    at once, keeping what it stored. Outside a run (say, while exporting) it waits."""

    def __init__(self) -> None:
        self.running = False
        signal.signal(signal.SIGUSR1, self._interrupt)

    def _interrupt(self, _number: int, _frame: Any) -> None:
        if self.running:
            raise KeyboardInterrupt

    def run(self, *args: Any) -> tuple[bool, BaseException | None]:
        """run_machine(*args): (False, None) if interrupted, else (True, its result)."""
        self.running = True
        try:
            return True, run_machine(*args)
        except KeyboardInterrupt:
            return False, None
        finally:
            self.running = False


def worker_main(plan: WorkerPlan, conn: Connection, stop: Any, current: Any) -> None:
    """The worker process: run until `stop` is set (or SIGUSR1, or the coordinator is gone);
    report through `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.dup2(2, 1)
    interruptible = Interruptible()
    target = resolve_target(plan.target)
    classes = machine_classes(target, plan.device)
    database = plan.database.open(target.name, plan.device)
    prepare_process()
    rng = random.Random(plan.seed)
    stats, events = Stats(), Counter[str]()
    reporter = Reporter(conn, stats, events, plan.report_seconds, lambda: database_health(database))
    started = time.monotonic()
    last_database_pass = None
    found: set[FindingKey] = set()
    """Keys this worker has reported: its search passes mask them (its database passes do not,
    so that stored failures replay and stay stored)."""
    while not (stop.is_set() or reporter.orphaned):
        which = SEARCH
        if last_database_pass is None or time.monotonic() - last_database_pass >= plan.reuse_seconds:
            which, last_database_pass = DATABASE, time.monotonic()
        for index, name in enumerate(plan.machines):
            if stop.is_set() or reporter.orphaned:
                break
            run_seed = rng.randrange(2**32)
            current[:] = [index, run_seed, which]
            run_database = RunDatabase(database)
            run = run_settings(run_database, plan.examples_per_run, which)
            mask = FindingMask(frozenset(found) if which == SEARCH else frozenset())
            finished, error = interruptible.run(
                classes[name], stats, run_seed, run, lambda s: count_events(s, events), mask
            )
            settle_run(run_database, finished, error)
            if not finished:
                break
            if error is not None:
                finding = run_finding(name, error, run_seed, started, mask, stats)
                finding.snippet = snippet_of(finding, target, plan.device)
                found.update(finding.keys)
                reporter.send(report_finding(plan, finding, target, PASS_NAMES[which]))
    reporter.close()


def settle_run(run_database: RunDatabase, finished: bool, error: BaseException | None) -> None:
    """After a run: an interrupted one leaves no failure under a primary key, a finished one
    only the failure it reported (if its blob tells which; else the database stays as it is)."""
    if not finished:
        run_database.settle(None)
    elif error is not None and (reported := reported_choices(error)) is not None:
        run_database.settle(reported)


def report_finding(plan: WorkerPlan, finding: Any, target: Any, via: str) -> dict:
    """Export the finding to disk, then say what was written."""
    try:
        exported = export_finding(Path(plan.findings_dir), finding, target, plan.device, via, worker_seed=plan.seed)
    except Exception as error:  # the finding stands even if its export fails: report both
        return {"type": "export-failed", "machine": finding.machine, "invariant": finding.invariant,
                "seed": finding.seed, "error": f"{type(error).__name__}: {error}"}
    report = exported.report
    return {
        "type": "finding",
        "id": exported.identifier,
        "new": exported.path is not None,
        "path": str(Path(plan.findings_dir) / exported.identifier),
        "kind": report["kind"],
        "invariant": finding.invariant,
        "severity": finding.severity,
        "machine": finding.machine,
        "seed": finding.seed,
        "via": via,
    }


def rerun(
    target: str, device: str, machine: str, run_seed: int, examples_per_run: int, database: DatabaseSpec | None = None
) -> BaseException | None:
    """A worker's run again: a search run from its seed with no database, or, given the
    campaign's `database`, a database pass over it. What a crash finding reproduces."""
    bound = resolve_target(target)
    which = SEARCH if database is None else DATABASE
    stored = None if database is None else database.open(bound.name, device)
    machines = machine_classes(bound, device)
    return run_machine(machines[machine], Stats(), run_seed, run_settings(stored, examples_per_run, which))
