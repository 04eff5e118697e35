"""`swa-canary simulate`: a serving-like scheduler loop over the reference allocator with the
runtime canary attached, and optional fault injection.

Each step: requests arrive (a geometric number, `arrival_rate` on average), take a free
req_to_token row, prefill in chunks under a per-step token budget, then decode one token per
step; tokens that leave the sliding window lose their SWA slots (`free_swa` on page-floored
spans); finished requests are freed in one free group. An allocation that fails leaves its
requests waiting; a step in which nothing could be allocated retracts the newest request that
holds slots (freed, back to the queue), as a serving scheduler does under memory pressure.
Then the canary steps with the live batch.

`inject` corrupts the allocator once, at a random step, in a way that breaks the named
invariant (see INJECTIONS); the run stops when the canary reports that invariant and says how
many steps after the injection it did.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, TextIO

import torch

from allocator import IntegerError, SWATokenToKVPoolAllocator
from allocator.validation import check_int
from canary.invariants import Name
from canary.monitor import MODES, CanaryMonitor, attach
from canary.report import CanaryRecord


class SimulationConfigError(ValueError):
    """A simulation that cannot run as configured."""


class SimulationIntegerError(IntegerError, SimulationConfigError):
    """A simulation setting that must be an int of at least its bound is not."""


@dataclass(frozen=True)
class SimulationConfig:
    steps: int = 2000
    page_size: int = 1
    size: int = 65536
    size_swa: int = 16384
    window: int = 512
    device: str = "cpu"
    every: int = 16
    inject: str | None = None
    seed: int = 0
    canary: str = "warn"
    """The monitor's mode ("off" for a baseline without the canary)."""
    max_running: int = 64
    prefill_budget: int = 2048
    """Prompt tokens prefilled per step, over all requests."""
    arrival_rate: float = 0.5
    prompt_tokens: tuple[int, int] = (64, 2048)
    output_tokens: tuple[int, int] = (16, 512)

    def validate(self) -> None:
        ints = {"steps": 1, "page_size": 1, "size": 1, "size_swa": 1, "window": 1, "every": 1, "max_running": 1,
                "prefill_budget": 1}
        for name, lowest in ints.items():
            check_int(name, getattr(self, name), lowest, SimulationIntegerError)
        for name in ("size", "size_swa"):
            if getattr(self, name) % self.page_size:
                raise SimulationConfigError(
                    f"{name}={getattr(self, name)} is not a multiple of page_size={self.page_size}"
                )
        if self.canary not in MODES:
            raise SimulationConfigError(f"canary must be one of {MODES}, got {self.canary!r}")
        if not 0 <= self.arrival_rate < float("inf"):
            raise SimulationConfigError(f"arrival_rate must be a finite number >= 0, got {self.arrival_rate!r}")
        for name in ("prompt_tokens", "output_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise SimulationConfigError(
                    f"{name} must be a range (low, high) with 1 <= low <= high, got {(low, high)}"
                )
        if self.device not in ("cpu", "cuda"):
            raise SimulationConfigError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SimulationConfigError("device cuda, but torch sees no CUDA device")
        if self.max_context + self.page_size > self.size:
            raise SimulationConfigError(f"size={self.size} cannot hold one request of {self.max_context} tokens")
        # An empty SWA pool must fit one request's window plus a prefill chunk, or it never progresses.
        if self.window + self.prefill_budget + 2 * self.page_size > self.size_swa:
            raise SimulationConfigError(
                f"size_swa={self.size_swa} must exceed window + prefill_budget + 2 x page_size "
                f"= {self.window + self.prefill_budget + 2 * self.page_size}"
            )
        if self.inject is not None:
            if self.inject not in INJECTIONS:
                raise SimulationConfigError(f"unknown injection {self.inject!r}; known: {', '.join(INJECTIONS)}")
            if self.steps < self.every:
                raise SimulationConfigError(f"an injection needs steps >= every ({self.every}), so a check follows it")
            if self.canary == "off":
                raise SimulationConfigError("an injection needs the canary on")
        if self.inject == Name.WINDOW and self.window < self.every + 2:
            raise SimulationConfigError(f"WINDOW injection needs window >= every + 2 = {self.every + 2}, "
                                        "so the fault is still in the window at the next check")

    @property
    def max_context(self) -> int:
        return -(-(self.prompt_tokens[1] + self.output_tokens[1]) // self.page_size) * self.page_size


@dataclass
class Request:
    prompt_len: int
    output_len: int
    row: int = -1
    seq_len: int = 0
    evict_floor: int = 0
    """Tokens before this position have released their SWA slots."""

    @property
    def prefilled(self) -> bool:
        return self.seq_len >= self.prompt_len

    @property
    def done(self) -> bool:
        return self.seq_len >= self.prompt_len + self.output_len


@dataclass(frozen=True)
class Injection:
    invariant: Name
    step: int
    what: str


@dataclass
class SimulationReport:
    config: SimulationConfig
    steps: int = 0
    seconds: float = 0.0
    finished: int = 0
    retracted: int = 0
    allocation_failures: int = 0
    peak_running: int = 0
    checks: int = 0
    records: list[CanaryRecord] = field(default_factory=list)
    injection: Injection | None = None
    detection: CanaryRecord | None = None

    @property
    def passed(self) -> bool:
        """An injected fault was reported, or nothing was injected and nothing reported."""
        if self.config.inject is not None:
            return self.detection is not None
        return not self.records

    def summary(self) -> list[str]:
        config = self.config
        lines = [
            f"{self.steps} steps in {self.seconds:.1f}s on {config.device}: {self.finished} requests finished, "
            f"{self.retracted} retracted, {self.allocation_failures} allocations refused, "
            f"peak {self.peak_running} running; "
            f"{self.checks} canary checks (every {config.every} steps, seed {config.seed})"
        ]
        if config.inject is not None:
            if self.injection is None:
                lines.append(f"could not inject {config.inject}: no suitable state before the last check")
            else:
                lines.append(
                    f"injected {self.injection.invariant} at step {self.injection.step}: {self.injection.what}"
                )
                if self.detection is None:
                    lines.append(f"NOT REPORTED: the canary did not report {self.injection.invariant}")
                else:
                    delay = self.detection.reported_step - self.injection.step
                    lines.append(
                        f"reported at step {self.detection.reported_step}, {delay} steps after the injection "
                        f"(checked at step {self.detection.checked_step}): {self.detection.violation().explain()}"
                    )
        others = [record for record in self.records if record is not self.detection]
        if others:
            lines.append(f"{len(others)} {'other ' if self.detection else ''}records:")
            lines += [f"  step {record.reported_step}: {record.violation().explain()}" for record in others]
        elif config.inject is None:
            lines.append("no violation reported")
        return lines


class Simulator:
    """The scheduler loop; `step` = `advance` (scheduling, allocation, eviction, injection) +
    `check` (the canary's step, nothing else)."""

    def __init__(self, config: SimulationConfig, logger: logging.Logger | None = None) -> None:
        config.validate()
        self.config = config
        self.rng = random.Random(config.seed)
        self.device = torch.device(config.device)
        self.allocator = SWATokenToKVPoolAllocator(
            config.size, config.size_swa, config.page_size, torch.float16, self.device
        )
        self.req_to_token = torch.zeros((config.max_running, config.max_context), dtype=torch.int64, device=self.device)
        self.free_rows = list(range(config.max_running))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.monitor: CanaryMonitor = attach(
            self.allocator, every=config.every, mode=config.canary, window=config.window, logger=logger, name="simulate"
        )
        self.report = SimulationReport(config)
        self.batch: dict[str, torch.Tensor] = {}
        self._records_seen = 0
        # An injection must come no later than the last check, so that a check can see it.
        self._last_check = config.steps - config.steps % config.every
        self._inject_from = None
        if config.inject is not None:
            self._inject_from = self.rng.randint(max(1, self._last_check // 4), self._last_check)

    @property
    def step_index(self) -> int:
        return self.report.steps

    # ---------------------------------------------------------------- a step
    def step(self) -> None:
        self.advance()
        self.check()

    def advance(self) -> None:
        self.report.steps += 1
        self._arrive()
        self._admit()
        prefilled = self._prefill()
        decoded = self._decode()
        self._finish()
        if not (prefilled or decoded) and self.running:
            self._retract()
        self._evict()
        if self.config.inject is not None and self._inject_from is not None and self.report.injection is None:
            self._try_inject(Name(self.config.inject), self._inject_from)
        self.report.peak_running = max(self.report.peak_running, len(self.running))
        self.batch = self._batch()

    def check(self) -> None:
        self.monitor.step(**self.batch)
        self._note_records()

    def run(self, progress: Callable[["Simulator"], None] | None = None) -> SimulationReport:
        started = time.monotonic()
        for _ in range(self.config.steps):
            self.step()
            if progress is not None:
                progress(self)
            if self.report.detection is not None:
                break  # the allocator is corrupt from here on
        self.monitor.flush()
        self._note_records()
        self.report.seconds = time.monotonic() - started
        self.report.checks = self.monitor.stats().checks
        return self.report

    # ------------------------------------------------------------ scheduling
    def _arrive(self) -> None:
        config = self.config
        # Geometric arrivals: continue with probability rate / (1 + rate), mean `arrival_rate`.
        while self.rng.random() < config.arrival_rate / (1 + config.arrival_rate):
            self.waiting.append(
                Request(self.rng.randint(*config.prompt_tokens), self.rng.randint(*config.output_tokens))
            )

    def _admit(self) -> None:
        while self.waiting and self.free_rows:
            request = self.waiting.popleft()
            request.row = self.free_rows.pop()
            self.running.append(request)

    def _prefill(self) -> bool:
        budget = self.config.prefill_budget
        # A new request starts only if its chunk fits beside a page per decoding request.
        room = self.allocator.available_size() - self.config.page_size * sum(r.prefilled for r in self.running)
        chunks: list[tuple[Request, int]] = []
        for request in self.running:
            if budget and not request.prefilled:
                tokens = min(request.prompt_len - request.seq_len, budget)
                if request.seq_len == 0 and tokens > room:
                    break
                chunks.append((request, tokens))
                budget -= tokens
                room -= tokens
        if not chunks:
            return False
        # Under pressure, the oldest request's chunk alone may still fit.
        if self._extend(chunks) or (len(chunks) > 1 and self._extend(chunks[:1])):
            return True
        self.report.allocation_failures += 1
        return False

    def _extend(self, chunks: list[tuple[Request, int]]) -> bool:
        prefix = [request.seq_len for request, _ in chunks]
        seq = [request.seq_len + tokens for request, tokens in chunks]
        total = sum(seq) - sum(prefix)
        if self.config.page_size == 1:
            tokens = self.allocator.alloc(total)
        else:
            rows = self._ids([request.row for request, _ in chunks])
            prefix_device = self._ids(prefix)
            last_loc = torch.where(prefix_device > 0, self.req_to_token[rows, (prefix_device - 1).clamp(min=0)], -1)
            tokens = self.allocator.alloc_extend(
                prefix_device, torch.tensor(prefix), self._ids(seq), torch.tensor(seq), last_loc, total
            )
        if tokens is None:
            return False
        self._write([(request.row, request.seq_len, request.seq_len + n) for request, n in chunks], tokens)
        for request, n in chunks:
            request.seq_len += n
        return True

    def _decode(self) -> bool:
        batch = [request for request in self.running if request.prefilled and not request.done]
        if not batch:
            return False
        if self.config.page_size == 1:
            tokens = self.allocator.alloc(len(batch))
        else:
            seq = [request.seq_len + 1 for request in batch]
            rows, positions = self._ids([r.row for r in batch]), self._ids([r.seq_len - 1 for r in batch])
            tokens = self.allocator.alloc_decode(self._ids(seq), torch.tensor(seq), self.req_to_token[rows, positions])
        if tokens is None:
            self.report.allocation_failures += 1
            return False
        self._write([(request.row, request.seq_len, request.seq_len + 1) for request in batch], tokens)
        for request in batch:
            request.seq_len += 1
        return True

    def _finish(self) -> None:
        done = [request for request in self.running if request.done]
        if not done:
            return
        self.allocator.free_group_begin()
        for request in done:
            self._release(request)
        self.allocator.free_group_end()
        self.report.finished += len(done)

    def _retract(self) -> None:
        holding = [request for request in self.running if request.seq_len > 0]
        if not holding:
            return
        request = holding[-1]
        self._release(request)
        request.seq_len = request.evict_floor = 0
        self.waiting.appendleft(request)
        self.report.retracted += 1

    def _release(self, request: Request) -> None:
        self.allocator.free(self.req_to_token[request.row, : request.seq_len])
        self.running.remove(request)
        self.free_rows.append(request.row)

    def _evict(self) -> None:
        ps, window = self.config.page_size, self.config.window
        spans = []
        for request in self.running:
            floor = max(0, request.seq_len - window) // ps * ps
            if floor > request.evict_floor:
                spans.append((request.row, request.evict_floor, floor))
                request.evict_floor = floor
        if spans:
            rows, positions = self._positions(spans)
            self.allocator.free_swa(self.req_to_token[rows, positions])

    def _batch(self) -> dict[str, torch.Tensor]:
        """The live batch as a serving engine keeps it on the device."""
        live = [request for request in self.running if request.seq_len > 0]
        return {
            "req_to_token": self.req_to_token,
            "req_pool_indices": self._ids([request.row for request in live]),
            "seq_lens": self._ids([request.seq_len for request in live]),
            "evict_floors": self._ids([request.evict_floor for request in live]),
        }

    # --------------------------------------------------------------- helpers
    def _ids(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _positions(self, spans: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position) index tensors for the half-open position spans [start, end) of rows."""
        rows = [row for row, start, end in spans for _ in range(end - start)]
        positions = [position for _, start, end in spans for position in range(start, end)]
        return self._ids(rows), self._ids(positions)

    def _write(self, spans: list[tuple[int, int, int]], tokens: torch.Tensor) -> None:
        rows, positions = self._positions(spans)
        self.req_to_token[rows, positions] = tokens

    # ------------------------------------------------------------- injection
    def _try_inject(self, invariant: Name, inject_from: int) -> None:
        if self.step_index < inject_from or self.step_index > self._last_check:
            return
        what = INJECTIONS[invariant](self)
        if what is not None:
            self.report.injection = Injection(invariant, self.step_index, what)

    def _note_records(self) -> None:
        total = self.monitor.stats().records
        if total == self._records_seen:
            return
        new = self.monitor.recent()[-(total - self._records_seen) :]
        self._records_seen = total
        self.report.records += new
        injection = self.report.injection
        if injection is None or self.report.detection is not None:
            return
        for record in new:
            if record.invariant == injection.invariant and record.checked_step >= injection.step:
                self.report.detection = record
                return


# ------------------------------------------------------------------ faults
# Each returns what it did, or None when the state offers nothing to corrupt yet.
def _zero_in_window_entry(sim: Simulator) -> str | None:
    """A token inside a request's window loses its SWA slot (the slot itself is not freed).
    Not the request's last token: that one is the next allocation's last_loc."""
    every = sim.config.every
    candidates = [
        r
        for r in sim.running
        if r.prefilled and r.seq_len >= 2 and r.prompt_len + r.output_len - r.seq_len >= every + 2
    ]
    if not candidates:
        return None
    request = candidates[0]  # the oldest: retraction under pressure takes the newest
    position = request.seq_len - 2
    token = int(sim.req_to_token[request.row, position])
    sim.allocator.full_to_swa_index_mapping[token] = 0
    return (
        f"zeroed the mapping of full token {token} "
        f"(req_to_token row {request.row}, position {position}, in the window)"
    )


def _duplicate_free_unit(sim: Simulator) -> str | None:
    """The full free list's last unit appears twice (allocation takes from the front, so the
    copies stay in the list)."""
    pool = sim.allocator.full_attn_allocator
    if pool.free_pages.numel() == 0:
        return None
    pool.free_pages = torch.cat((pool.free_pages, pool.free_pages[-1:]))
    return f"appended a second copy of full unit {int(pool.free_pages[-1])} to the full free list"


def _overwrite_sentinel(sim: Simulator) -> str:
    # ps - 1 still passes the allocator's last_loc checks for new requests, so serving goes on.
    value = sim.config.page_size - 1
    sim.allocator.full_to_swa_index_mapping[-1] = value
    return f"overwrote the sentinel mapping[-1] with {value}"


def _leak_swa_unit(sim: Simulator) -> str | None:
    pool = sim.allocator.swa_attn_allocator
    if pool.free_pages.numel() == 0:
        return None
    unit = int(pool.free_pages[-1])
    pool.free_pages = pool.free_pages[:-1]
    return f"dropped SWA unit {unit} from the SWA free list without mapping it (leaked)"


def _free_live_swa_unit(sim: Simulator) -> str | None:
    """A live SWA unit is put back in the SWA free list while the mapping still points at it."""
    live = [request for request in sim.running if request.seq_len > 0]
    if not live:
        return None
    request = live[0]
    token = int(sim.req_to_token[request.row, request.seq_len - 1])
    peer = int(sim.allocator.full_to_swa_index_mapping[token])
    pool = sim.allocator.swa_attn_allocator
    unit = peer // sim.config.page_size
    pool.free_pages = torch.cat((pool.free_pages, sim._ids([unit])))
    return f"returned live SWA unit {unit} (peer of full token {token}) to the SWA free list; the mapping still uses it"


def _put_padding_unit_in_free_list(sim: Simulator) -> str:
    pool = sim.allocator.full_attn_allocator
    pool.free_pages = torch.cat((pool.free_pages, sim._ids([0])))
    return "appended padding unit 0 to the full free list"


def _stale_mapping_on_free_unit(sim: Simulator) -> str | None:
    """The full free list's last unit maps to an SWA unit taken from the SWA free list, as if
    it had been freed without its SWA peer (the last unit stays free the longest)."""
    allocator, ps = sim.allocator, sim.config.page_size
    full, swa = allocator.full_attn_allocator, allocator.swa_attn_allocator
    if full.free_pages.numel() == 0 or swa.free_pages.numel() == 0:
        return None
    unit, peer = int(full.free_pages[-1]), int(swa.free_pages[-1])
    swa.free_pages = swa.free_pages[:-1]
    offsets = torch.arange(ps, device=sim.device)
    allocator.full_to_swa_index_mapping[unit * ps + offsets] = peer * ps + offsets
    return f"free full unit {unit} now maps to SWA unit {peer}, as if it was freed without its SWA peer"


INJECTIONS: dict[Name, Callable[[Simulator], str | None]] = {
    Name.WINDOW: _zero_in_window_entry,
    Name.NODUP: _duplicate_free_unit,
    Name.SENTINEL: _overwrite_sentinel,
    Name.SWA_LE_FULL: _leak_swa_unit,
    Name.CONSERVE: _free_live_swa_unit,
    Name.PAD: _put_padding_unit_in_free_list,
    Name.STALE: _stale_mapping_on_free_unit,
}


# ------------------------------------------------------------------ display
class Progress:
    """A single updating line on a terminal; a line every `interval` seconds otherwise.
    `message` prints a line above it (records, as they are reported)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if not self.tty else 0.1
        self._last = float("-inf")
        self._text = ""

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last, self._text = now, text
        self.stream.write(f"\r{text}\x1b[K" if self.tty else f"{text}\n")
        self.stream.flush()

    def message(self, line: str) -> None:
        if self.tty and self._text:
            self.stream.write(f"\r\x1b[K{line}\n{self._text}")
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._text:
            self.stream.write("\n")
            self.stream.flush()


def describe_step(sim: Simulator) -> str:
    config, allocator = sim.config, sim.allocator
    return (
        f"step {sim.step_index}/{config.steps}: {len(sim.running)} running, {len(sim.waiting)} waiting, "
        f"{sim.report.finished} finished; free full {allocator.full_available_size()}/{config.size}, "
        f"SWA {allocator.swa_available_size()}/{config.size_swa}; {len(sim.report.records)} records"
    )


class ProgressLogHandler(logging.Handler):
    """Sends log lines (the canary's records) through a `Progress` display."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.message(self.format(record))


def simulate(config: SimulationConfig, stream: TextIO | None = None) -> SimulationReport:
    """Run a simulation with a progress display and the records on `stream`."""
    progress = Progress(stream)
    logger = logging.getLogger("swa_canary.simulate")
    logger.propagate = False
    handler = ProgressLogHandler(progress)
    logger.addHandler(handler)
    try:
        simulator = Simulator(config, logger=logger)
        report = simulator.run(lambda sim: progress.update(describe_step(sim)))
        progress.update(describe_step(simulator), force=True)
    finally:
        logger.removeHandler(handler)
        progress.close()
    return report
