"""`swa-canary fuzz`: an overnight campaign of worker processes sharing one example database.

The coordinator starts N workers (properties/campaign_worker.py, `spawn` processes), each
with its own seed, and supervises them until the duration is spent or SIGINT / SIGTERM:
- it adds up their progress and shows it (properties/campaign_progress.py);
- it relays their findings, which they have already written to OUT/findings/<id>/;
- each worker runs the target in a process of its own (CampaignConfig.isolate, the default),
  so a target that segfaults, aborts or hangs is a CRASH or HANG finding with a minimal
  program and the worker goes on;
- a worker that dies nonetheless (a signal, os._exit, a CUDA error) becomes a finding of kind "crash"
  with the machine and seed it was running, and is replaced by a fresh worker (with a delay
  when one slot keeps dying);
- on SIGINT or SIGTERM (or at the end of the duration) it stops the workers between runs,
  interrupting a run that goes on for more than a second (Hypothesis stops cleanly and keeps
  what it stored), so the database stays intact, and prints a summary. A second signal
  terminates the workers at once.
Started again on the same OUT it first re-runs every exported finding and reports which still
fail; the workers' first database pass then replays every stored failure.

Each worker talks to the coordinator through its own pipe: a killed worker can only break
its own channel.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from canary.invariants import INVARIANTS, Name
from properties.campaign.database import DatabaseSpec, check_redis_available
from properties.campaign.progress import ProgressDisplay
from properties.campaign.resume import PASSES, check_known
from properties.campaign.worker import PASS_NAMES, WorkerPlan, worker_main
from properties.machines import MACHINES
from properties.runners.export import exported_findings, write_crash
from properties.targets import isolated_spec, resolve_target

CRASH_WINDOW_SECONDS = 60.0
"""A slot that dies more than twice within this window waits before its next restart."""
MAX_RESTART_DELAY = 60.0
INTERRUPT_SECONDS = 1.0
"""How long stopping workers may go on with their current run before it is interrupted."""


class CampaignConfigError(ValueError):
    """A campaign that cannot run as configured."""


@dataclass(frozen=True)
class CampaignConfig:
    target: str = "reference"
    device: str = "cpu"
    duration: float = 8 * 3600.0
    workers: int = 1
    out: Path = Path("fuzz-out")
    database: DatabaseSpec | None = None
    """None: a directory database in out/examples."""
    seed: int | None = None
    machines: tuple[str, ...] = tuple(sorted(MACHINES))
    examples_per_run: int = 25
    status_seconds: float = 10.0
    report_seconds: float = 1.0
    reuse_seconds: float = 300.0
    grace_seconds: float = 15.0
    """How long stopping workers may take before they are terminated."""
    isolate: bool = True
    """Run the target in its own process under each worker (TARGET@, unless the target names
    its Python): a target that crashes or hangs is then a CRASH or HANG finding, shrunk, and
    the worker goes on. False runs it in the workers themselves: faster, and a crash kills the
    worker (a "crash" finding with no minimal program; the worker is replaced)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.machines) - set(MACHINES))
        problems = [
            "workers must be at least 1" if self.workers < 1 else "",
            "duration must not be negative" if self.duration < 0 else "",
            "examples per run must be at least 1" if self.examples_per_run < 1 else "",
            "no machine to run" if not self.machines else "",
            f"unknown machines {unknown} (known: {sorted(MACHINES)})" if unknown else "",
        ]
        problems = [problem for problem in problems if problem]
        if problems:
            raise CampaignConfigError("; ".join(problems))

    @property
    def worker_target(self) -> str:
        """The target spec the workers resolve."""
        return isolated_spec(self.target) if self.isolate else self.target

    @property
    def findings_dir(self) -> Path:
        return self.out / "findings"

    @property
    def database_spec(self) -> DatabaseSpec:
        return self.database or DatabaseSpec.parse(None, self.out)


@dataclass
class Worker:
    plan: WorkerPlan
    process: Any
    conn: Any
    current: Any
    """Shared (machine index, run seed, pass) of the run in progress."""
    stopped: bool = False


@dataclass
class Totals:
    programs: int = 0
    steps: int = 0
    calls: Counter = field(default_factory=Counter)
    events: Counter = field(default_factory=Counter)
    new_findings: list[str] = field(default_factory=list)
    seen_again: int = 0
    crashes: int = 0
    restarts: int = 0
    database: dict[int, dict] = field(default_factory=dict)
    """The latest database health each worker slot reported."""

    def add(self, slot: int, message: dict) -> None:
        self.database[slot] = message.get("database", {})
        self.programs += message["programs"]
        self.steps += message["steps"]
        self.calls.update(message["calls"])
        self.events.update(message["events"])


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return signal.Signals(-exitcode).name
    return f"exit {exitcode}"


class Campaign:
    def __init__(self, config: CampaignConfig, display: ProgressDisplay | None = None) -> None:
        self.config = config
        self.display = display or ProgressDisplay(config.status_seconds)
        self.master = random.randrange(2**32) if config.seed is None else config.seed
        self.rng = random.Random(self.master)
        self.context = multiprocessing.get_context("spawn")
        self.stop_event = self.context.Event()
        self.workers: dict[int, Worker] = {}
        self.restart_at: dict[int, float] = {}
        self.crash_times: dict[int, list[float]] = {}
        self.totals = Totals()
        self.stopped_by: str | None = None
        self.stopping = False
        self.signals = 0
        self.started = time.monotonic()
        self.known: dict[str, tuple[str, str]] = {}

    # ----------------------------------------------------------- lifecycle
    def run(self) -> dict:
        """Run the campaign to its end; the summary record."""
        config = self.config
        resolve_target(config.worker_target)
        check_redis_available(config.database_spec)
        config.findings_dir.mkdir(parents=True, exist_ok=True)
        previous = self._install_signal_handlers()
        try:
            self._resume()
            self.started = time.monotonic()
            for slot in range(config.workers):
                self._start(slot)
            self._supervise()
        finally:
            self._stop_workers()
            self._restore_signal_handlers(previous)
        summary = self.summary()
        self.display.status(self.status(), force=True)
        self.display.event(summary)
        self.display.close()
        return summary

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {number: signal.signal(number, self._on_signal) for number in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def _on_signal(self, number: int, _frame: Any) -> None:
        self.signals += 1
        if self.stopped_by is None:
            self.stopped_by = signal.Signals(number).name

    def _resume(self) -> None:
        known = exported_findings(self.config.findings_dir)
        if not known:
            return
        self.known = check_known(known, self.config.worker_target, self.config.device)
        self.display.event(
            {
                "event": "resume",
                "known": len(known),
                "still_failing": sorted(name for name, (outcome, _) in self.known.items() if outcome != PASSES),
                "fixed": sorted(name for name, (outcome, _) in self.known.items() if outcome == PASSES),
            }
        )

    # ----------------------------------------------------------- workers
    def _plan(self, slot: int) -> WorkerPlan:
        config = self.config
        return WorkerPlan(
            slot=slot,
            seed=self.rng.randrange(2**32),
            target=config.worker_target,
            device=config.device,
            database=config.database_spec,
            findings_dir=str(config.findings_dir),
            machines=config.machines,
            examples_per_run=config.examples_per_run,
            report_seconds=config.report_seconds,
            reuse_seconds=config.reuse_seconds,
        )

    def _start(self, slot: int) -> None:
        plan = self._plan(slot)
        reader, writer = self.context.Pipe(duplex=False)
        current = self.context.Array("q", [-1, 0, 0], lock=False)
        process = self.context.Process(
            target=worker_main,
            args=(plan, writer, self.stop_event, current),
            name=f"swa-canary-worker-{slot}",
            daemon=True,
        )
        process.start()
        writer.close()
        self.workers[slot] = Worker(plan, process, reader, current)

    def _supervise(self) -> None:
        deadline = self.started + self.config.duration
        while self.stopped_by is None:
            if time.monotonic() >= deadline:
                self.stopped_by = "duration"
                break
            self._poll(timeout=0.2)
            self._restart_due()
            self.display.status(self.status())

    def _poll(self, timeout: float) -> None:
        """Handle every message that arrives within `timeout`, and every worker that died."""
        live = {worker.conn: worker for worker in self.workers.values()}
        sentinels = {worker.process.sentinel: worker for worker in self.workers.values()}
        for ready in wait([*live, *sentinels], timeout):
            worker = live.get(ready)
            if worker is not None:
                self._drain(worker)
        for slot, worker in list(self.workers.items()):
            if worker.process.exitcode is not None:
                self._drain(worker)
                del self.workers[slot]
                worker.conn.close()
                if not (worker.stopped or self.stopping):
                    self._crashed(worker)

    def _drain(self, worker: Worker) -> None:
        try:
            while worker.conn.poll():
                self._handle(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass  # its process is gone; _poll sees it exit

    def _handle(self, worker: Worker, message: dict) -> None:
        kind = message.pop("type")
        if kind == "progress":
            self.totals.add(worker.plan.slot, message)
        elif kind == "stopped":
            worker.stopped = True
        elif kind == "finding":
            if message["new"]:
                self.totals.new_findings.append(message["id"])
            else:
                self.totals.seen_again += 1
            self.display.event({"event": "finding", "worker": worker.plan.slot, **message})
        else:
            self.display.event({"event": kind, "worker": worker.plan.slot, **message})

    def _crashed(self, worker: Worker) -> None:
        plan = worker.plan
        index, run_seed, which = list(worker.current)
        machine = plan.machines[index] if index >= 0 else "(starting)"
        status = describe_exit(worker.process.exitcode)
        identifier = f"crash-{machine.lower()}-{status.lower().replace(' ', '')}"
        report = {
            "id": identifier,
            "kind": "crash",
            "invariant": Name.CRASH,
            "severity": INVARIANTS[Name.CRASH].severity.value,
            "detail": f"worker process died ({status}) during a {PASS_NAMES[which]} run",
            "target": plan.target,
            "device": plan.device,
            "machine": machine,
            "seed": run_seed,
            "pass": PASS_NAMES[which],
            "worker_seed": plan.seed,
            "exitcode": worker.process.exitcode,
            "examples_per_run": plan.examples_per_run,
            "database": {"local": plan.database.local, "redis_url": plan.database.redis_url},
            "seconds": time.monotonic() - self.started,
        }
        path = write_crash(self.config.findings_dir, report)
        self.totals.crashes += 1
        if path is not None:
            self.totals.new_findings.append(identifier)
        self.display.event(
            {
                "event": "crash",
                "worker": plan.slot,
                "pid": worker.process.pid,
                "status": status,
                "machine": machine,
                "seed": run_seed,
                "new": path is not None,
                "path": str(self.config.findings_dir / identifier),
            }
        )
        now = time.monotonic()
        recent = [moment for moment in self.crash_times.get(plan.slot, []) if now - moment < CRASH_WINDOW_SECONDS]
        self.crash_times[plan.slot] = recent + [now]
        delay = 0.0 if len(recent) < 2 else min(2.0 ** (len(recent) - 1), MAX_RESTART_DELAY)
        self.restart_at[plan.slot] = now + delay

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self.restart_at.items()):
            if now >= when and self.stopped_by is None:
                del self.restart_at[slot]
                self.totals.restarts += 1
                self._start(slot)

    def _stop_workers(self) -> None:
        """Ask every worker to stop, interrupt the runs still going after INTERRUPT_SECONDS,
        and terminate whatever has not stopped after the grace period or a second signal.
        A worker that dies now is not a crash: it may not have installed its handlers yet."""
        self.stopping = True
        self.stop_event.set()
        self.restart_at.clear()
        now = time.monotonic()
        interrupt_at, deadline = now + INTERRUPT_SECONDS, now + self.config.grace_seconds
        signals_at_stop = self.signals
        interrupted = False
        while self.workers and time.monotonic() < deadline and self.signals <= max(signals_at_stop, 1):
            if not interrupted and time.monotonic() >= interrupt_at:
                interrupted = True
                for worker in self.workers.values():
                    if worker.process.exitcode is None:
                        os.kill(worker.process.pid, signal.SIGUSR1)
            self._poll(timeout=0.2)
        for worker in self.workers.values():
            worker.stopped = True
            worker.process.terminate()
        for worker in self.workers.values():
            worker.process.join(5.0)
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()
        self.workers.clear()

    # ----------------------------------------------------------- reporting
    def status(self) -> dict:
        elapsed = time.monotonic() - self.started
        totals = self.totals
        return {
            "elapsed": round(elapsed, 1),
            "duration": self.config.duration,
            "workers": len(self.workers),
            "pids": sorted(worker.process.pid for worker in self.workers.values()),
            "examples": totals.programs,
            "steps": totals.steps,
            "steps_per_s": round(totals.steps / elapsed, 1) if elapsed > 0 else 0.0,
            "calls": dict(sorted(totals.calls.items())),
            "events": dict(sorted(totals.events.items())),
            "findings": len(totals.new_findings),
            "seen_again": totals.seen_again,
            "crashes": totals.crashes,
            "restarts": totals.restarts,
            "database": self.database_health(),
        }

    def database_health(self) -> dict:
        """The database and, over Redis, whether the live workers reach it: "up" when all do,
        else "down" with how many do not (they keep examples locally and re-sync later)."""
        health: dict[str, Any] = {"spec": self.config.database_spec.describe()}
        reports = [self.totals.database.get(slot, {}) for slot in self.workers]
        redis = [report for report in reports if report]
        if redis:
            down = sum(report["redis"] == "down" for report in redis)
            health.update(redis="down" if down else "up", workers_down=down,
                          outages=sum(report["outages"] for report in redis))
        return health

    def summary(self) -> dict:
        status = self.status()
        return {
            "event": "summary",
            "stopped_by": self.stopped_by,
            "target": self.config.worker_target,
            "device": self.config.device,
            "seed": self.master,
            "database": self.config.database_spec.describe(),
            "findings_dir": str(self.config.findings_dir),
            "new_findings": list(self.totals.new_findings),
            "still_failing": sorted(name for name, (outcome, _) in self.known.items() if outcome != PASSES),
            "fixed": sorted(name for name, (outcome, _) in self.known.items() if outcome == PASSES),
            **{
                key: status[key]
                for key in ("elapsed", "examples", "steps", "steps_per_s", "calls", "events", "crashes", "restarts")
            },
        }


def run_campaign(config: CampaignConfig, display: ProgressDisplay | None = None) -> dict:
    return Campaign(config, display).run()
