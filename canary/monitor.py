"""The runtime canary: `attach(allocator)` returns a monitor that a scheduler steps once per
step, and that every N steps checks the allocator (and the live batch) without a host
synchronisation.

How one check travels. `sweep` packs the probes' and the detector's results into a device
buffer preallocated for its slot; a non-blocking copy moves it into the slot's pinned host
buffer and a CUDA event marks the copy's end. Two slots alternate, so a check can be queued
while the previous one is still in flight; a slot is read at the first step that finds its
event done (`Event.query` does not wait). A check that comes due while both slots are in
flight is skipped and counted. On the CPU a check is read at once.

Captured in a CUDA graph, `step` queues the check into a third slot, without an event (an
event cannot be queried while a capture is under way); every replay refills that slot, and
`flush` reads it. A captured check sees the allocator's tensors at the addresses they had at
capture, and its host-known sizes as they were then.

Reports: each violation once (by source, invariant, the checks broken and the items shown),
as a one-line JSON log record (`canary.report`), in the counters, in a bounded ring, and,
with `snapshot_dir`, with a snapshot of the checked state (`canary.snapshot`: keeping it
costs device copies of the mapping, the free lists and the batch's rows at each check;
writing it, a synchronisation, happens only when a new violation is found). Modes: "off" does
nothing, "warn" reports, "strict" also raises InvariantViolation from `step` or `flush` when a
FATAL violation is reported. In warn mode an internal error never reaches the caller, `attach`
included (an allocator the canary cannot read): the monitor logs one line and turns itself off.
Options it cannot work with raise CanaryConfigError in every mode.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from allocator.errors import IntegerError
from allocator.interface import SWAAllocator
from allocator.validation import check_int
from canary.invariants import InvariantViolation, Severity
from canary.probes import AllocatorView, run_probes, select_probes
from canary.report import CanaryRecord, Reporter
from canary.snapshot import Snapshot
from canary.sweep import (
    DIVERGENCE_INVARIANTS,
    Batch,
    SweepResult,
    read_sweep,
    sweep,
    sweep_rows,
)

MODES = ("off", "warn", "strict")
LOGGER_NAME = "swa_canary"
_SEEN_LIMIT = 1 << 16
"""Violations remembered for deduplication; the oldest are forgotten past this many."""


class CanaryConfigError(ValueError):
    """attach() was given an option it cannot work with."""


class CanaryIntegerError(IntegerError, CanaryConfigError):
    """A monitor setting that must be an int of at least its bound is not."""


@dataclass
class _Slot:
    """One read-back buffer pair and the check it holds."""

    device: Tensor
    host: Tensor
    event: Any
    """torch.cuda.Event marking the end of the copy; None on the CPU and for the graph slot."""
    step: int | None = None
    """The checked step while a check is in flight (or, for the graph slot, once captured)."""
    snapshot: Snapshot | None = None


@dataclass(frozen=True)
class MonitorStats:
    mode: str
    enabled: bool
    steps: int
    checks: int
    """Checks read back."""
    skipped: int
    """Checks skipped because both read-back slots were in flight."""
    records: int
    by_invariant: dict[tuple[str, str], int]
    """Records per (invariant, severity)."""
    divergence: dict[str, int] | None
    """The detector's totals of the latest check that ran it."""


class CanaryMonitor:
    """Use `attach` to make one."""

    def __init__(
        self,
        allocator: SWAAllocator,
        *,
        every: int,
        mode: str,
        window: int | None,
        page_size: int | None,
        probes: Iterable[str] | None,
        logger: logging.Logger | None,
        ring_size: int,
        snapshot_dir: str | os.PathLike | None,
        metrics: Any,
        max_indices: int,
        name: str | None,
    ) -> None:
        _check_config(every, mode, window, page_size, ring_size, max_indices)
        if probes is not None:
            select_probes(probes)  # an unknown name is an option error, in every mode
        self.allocator = allocator
        self.every = every
        self.mode = mode
        self.window = window
        self.name = name or f"{type(allocator).__name__}-{id(allocator):x}"
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self._steps = 0
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._active = mode != "off"
        logger = logger or logging.getLogger(LOGGER_NAME)
        self._reporter = Reporter(self.name, logger, ring_size, metrics if self._active else None)
        self._slots: list[_Slot] = []
        self._graph_slot: _Slot | None = None
        if self._active:
            self._guarded(lambda: self._prepare(allocator, page_size, probes, max_indices))

    def _prepare(
        self, allocator: SWAAllocator, page_size: int | None, probes: Iterable[str] | None, max_indices: int
    ) -> None:
        """Read the allocator once and set up the read-back slots (in warn mode, an allocator
        it cannot read turns the monitor off with one log line, as any later error does)."""
        if self.snapshot_dir is not None:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        view = AllocatorView.of(allocator)
        self.page_size = page_size or view.page_size
        self.probes = None if probes is None else tuple(probes)
        self.max_indices = max_indices
        # One dry run learns the layout (and rejects unknown probe names) before serving starts.
        self._names = run_probes(view, self.probes, max_indices).names
        device = view.mapping.device
        self._slots = [self._new_slot(device, with_event=True) for _ in range(2)]
        if device.type == "cuda":
            self._graph_slot = self._new_slot(device, with_event=False)

    def _new_slot(self, device: torch.device, with_event: bool) -> _Slot:
        shape = (sweep_rows(len(self._names)), self.max_indices + 1)
        if device.type != "cuda":
            buffer = torch.empty(shape, dtype=torch.int64, device=device)
            return _Slot(buffer, buffer, None)
        # Filled with -1 ("nothing found, detector not run") so an unreplayed graph slot reads clean.
        host = torch.full(shape, -1, dtype=torch.int64, pin_memory=True)
        event = torch.cuda.Event() if with_event else None
        return _Slot(torch.empty(shape, dtype=torch.int64, device=device), host, event)

    # ------------------------------------------------------------- the API
    @property
    def enabled(self) -> bool:
        return self._active

    def step(
        self,
        req_to_token: Tensor | None = None,
        req_pool_indices: Tensor | None = None,
        seq_lens: Tensor | None = None,
        evict_floors: Tensor | None = None,
    ) -> None:
        """Call once per scheduler step, with the live batch when there is one. Never waits
        for the device; in strict mode raises InvariantViolation on a FATAL report."""
        if self._active:
            self._guarded(lambda: self._step(Batch.of(req_to_token, req_pool_indices, seq_lens, evict_floors)))

    def flush(self) -> None:
        """Wait for every check in flight (and the graph slot's latest replay) and report it."""
        if self._active:
            self._guarded(self._flush)

    def recent(self) -> list[CanaryRecord]:
        """The latest records, oldest first (at most ring_size)."""
        return list(self._reporter.ring)

    def stats(self) -> MonitorStats:
        reporter = self._reporter
        return MonitorStats(
            mode=self.mode,
            enabled=self._active,
            steps=self._steps,
            checks=reporter.checks,
            skipped=reporter.skipped,
            records=sum(reporter.by_invariant.values()),
            by_invariant=dict(reporter.by_invariant),
            divergence=reporter.divergence,
        )

    # ------------------------------------------------------------ internals
    def _guarded(self, work: Callable[[], None]) -> None:
        if self.mode == "strict":
            work()
            return
        try:
            work()
        except Exception as error:  # warn mode: the canary must never take the server down
            self._active = False
            self._reporter.disabled(error)

    def _step(self, batch: Batch | None) -> None:
        self._steps += 1
        if self._graph_slot is not None and torch.cuda.is_current_stream_capturing():
            self._launch(self._graph_slot, batch, captured=True)
            return
        self._collect(wait=False)
        if self._steps % self.every:
            return
        free = [slot for slot in self._slots if slot.step is None]
        if not free:
            self._reporter.skip()
            return
        self._launch(free[0], batch, captured=False)
        self._collect(wait=False)

    def _launch(self, slot: _Slot, batch: Batch | None, captured: bool) -> None:
        view = AllocatorView.of(self.allocator)
        # A snapshot taken in a capture would hold the capture's state, not a replay's.
        if self.snapshot_dir is not None and not captured:
            slot.snapshot = Snapshot.capture(
                view, batch, window=self.window, page_size=self.page_size, step=self._steps, monitor=self.name
            )
        sweep(view, batch, self.window, page_size=self.page_size, probes=self.probes, max_indices=self.max_indices,
              out=slot.device)
        if slot.host is not slot.device:
            slot.host.copy_(slot.device, non_blocking=True)
        if slot.event is not None:
            slot.event.record()
        slot.step = self._steps

    def _collect(self, wait: bool) -> None:
        """Report the checks in flight, oldest first, stopping at the first unfinished one
        unless `wait`."""
        in_flight = sorted((s.step, i) for i, s in enumerate(self._slots) if s.step is not None)
        for checked_step, index in in_flight:
            slot = self._slots[index]
            if slot.event is not None:
                if wait:
                    slot.event.synchronize()
                elif not slot.event.query():
                    return
            snapshot = slot.snapshot
            slot.step, slot.snapshot = None, None
            self._report(read_sweep(self._names, slot.host), checked_step, snapshot)

    def _flush(self) -> None:
        self._collect(wait=True)
        graph_slot = self._graph_slot
        if graph_slot is not None and graph_slot.step is not None:
            torch.cuda.synchronize(graph_slot.device.device)
            self._report(read_sweep(self._names, graph_slot.host), graph_slot.step, None)

    def _report(self, result: SweepResult, checked_step: int, snapshot: Snapshot | None) -> None:
        current = {("probe", name): 0 for name in self._names}
        if result.divergence is not None:
            current.update({("divergence", invariant): 0 for invariant, _ in DIVERGENCE_INVARIANTS.values()})
        current.update({(source, v.invariant): v.count for source, v in result.sourced()})
        self._reporter.checked(current, result.divergence)
        new = [
            (source, v)
            for source, v in result.sourced()
            if self._first_sight((source, v.invariant, v.detail, *v.indices))
        ]
        if not new:
            return
        path = None
        if snapshot is not None and self.snapshot_dir is not None:
            path = str(snapshot.save(self.snapshot_dir / _snapshot_name(self.name, checked_step)))
        for source, violation in new:
            self._reporter.publish(
                CanaryRecord.of(
                    violation, source, checked_step=checked_step, reported_step=self._steps, monitor=self.name,
                    snapshot=path,
                )
            )
        fatal = [v for _, v in new if v.severity is Severity.FATAL]
        if self.mode == "strict" and fatal:
            raise InvariantViolation(fatal)

    def _first_sight(self, key: tuple) -> bool:
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > _SEEN_LIMIT:
            self._seen.popitem(last=False)
        return True


def attach(
    allocator: SWAAllocator,
    *,
    every: int = 16,
    mode: str = "warn",
    window: int | None = None,
    page_size: int | None = None,
    probes: Iterable[str] | None = None,
    logger: logging.Logger | None = None,
    ring_size: int = 256,
    snapshot_dir: str | os.PathLike | None = None,
    metrics: Any = None,
    max_indices: int = 8,
    name: str | None = None,
) -> CanaryMonitor:
    """Attach a runtime canary to an SWA allocator (SPEC §1 interface, or sglang's).

    every: check every N steps. mode: "off", "warn" or "strict". window: the sliding window;
    with it, steps that pass a batch also run the divergence detector. page_size: the page
    size of the detector's evict boundary (default: the allocator's). probes: the invariants
    to probe (default: every model-free one). logger: where records go (default
    "swa_canary"). ring_size: records kept for `recent()`. snapshot_dir: write a snapshot of
    each check that finds a new violation there. metrics: True (prometheus_client's default
    registry) or a CollectorRegistry, to export counters and gauges. max_indices: offending
    items shown per violation. name: the monitor's name in records and metric labels.
    """
    return CanaryMonitor(
        allocator,
        every=every,
        mode=mode,
        window=window,
        page_size=page_size,
        probes=probes,
        logger=logger,
        ring_size=ring_size,
        snapshot_dir=snapshot_dir,
        metrics=metrics,
        max_indices=max_indices,
        name=name,
    )


def _check_config(
    every: int, mode: str, window: int | None, page_size: int | None, ring_size: int, max_indices: int
) -> None:
    if mode not in MODES:
        raise CanaryConfigError(f"mode must be one of {MODES}, got {mode!r}")
    for label, value, lowest, optional in (
        ("every", every, 1, False),
        ("window", window, 1, True),
        ("page_size", page_size, 1, True),
        ("ring_size", ring_size, 1, False),
        ("max_indices", max_indices, 0, False),
    ):
        if value is None and optional:
            continue
        check_int(label, value, lowest, CanaryIntegerError)


def _snapshot_name(monitor: str, step: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", monitor)
    return f"swa-canary-{safe}-{os.getpid()}-step{step:09d}.pt"
