"""The per-step check at a cost in proportion to what the step changed; the whole state at the end.

After every step, `StepCheck.after_step` asks whether the allocator agrees with the model on
everything the step could change: the call's result, the three available sizes, whether a
free group is open, and the mapping and its translation at every full slot the step's calls
named or returned (whole pages at page size > 1) and at the sentinel. A call that replaces
the whole state is compared whole, on the device: `clear` with the state as constructed,
`restore_state` with the state the allocator had at the matching `backup_state`.
At the end of a program, `StepCheck.at_end` compares the whole final state with the model
on the device (the mapping and its translation entry by entry, each free list as a set in
which every free unit appears once) and runs the model-free probes on it (every final state
of a pool up to PROBED_ENTRIES_PER_PROGRAM entries; of larger pools, a fixed share of the
programs, since the probes read the whole pool).

Where anything disagrees, the full check of `step_checks` (every probe, every model-based
invariant, CONTRACT) runs on that state and names what is broken: a failing step is
reported as an every-step full check reports it, and only then costs time in proportion to
the pool. A passing step costs a few device operations on the touched slots, so a step
costs the same at 64 tokens as at 64K. What this leaves for later: a write where no call of
the step pointed is seen at the next step that touches it, or at the end of the program; a
free list in the wrong order, when the next allocation returns its units.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from canary.invariants import Violation
from canary.probes import (
    AllocatorView,
    free_units,
    has_sentinel,
    run_probes,
    sizes_and_group,
)
from properties.machines.driver import AllocatorDriver
from properties.machines.model import PoolModel, Request, SWAModel
from properties.machines.step_checks import Expectation, State, check_step, observe

ALLOCATIONS = frozenset(("alloc", "alloc_extend", "alloc_decode", "alloc_extend_swa_tail"))
RELEASES = frozenset(("free", "free_swa", "free_full"))
PROBED_ENTRIES_PER_PROGRAM = 4096
"""The probes' cost grows with the pool (6 ms at 64K tokens on a CPU core, against ~0.3 ms
for a whole program of checked steps): on larger pools they check one final state in
mapping_len / 4096, and still every failing step."""


@dataclass(frozen=True)
class DeviceState:
    """The mapping and both free lists (ready, then staged), as tensors on the device."""

    mapping: Tensor
    full_free: Tensor
    swa_free: Tensor

    @classmethod
    def read(cls, allocator: Any) -> DeviceState:
        """The allocator's state now (the mapping is the allocator's own tensor: compare it
        before the next call, or `capture` it)."""
        view = AllocatorView.of(allocator)
        return cls(view.mapping, view.full_free, view.swa_free)

    @classmethod
    def capture(cls, allocator: Any) -> DeviceState:
        """A copy of the allocator's state now, which later calls leave as it is."""
        return cls(*(tensor.clone() for tensor in cls.read(allocator).as_tuple()))

    def equals(self, other: DeviceState) -> bool:
        return all(torch.equal(mine, theirs) for mine, theirs in zip(self.as_tuple(), other.as_tuple()))

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.mapping, self.full_free, self.swa_free

    def as_lists(self) -> State:
        return State(*(tensor.tolist() for tensor in self.as_tuple()))


@functools.lru_cache(maxsize=64)
def fresh_state(model_config: tuple[int, int, int], device: torch.device) -> DeviceState:
    """What a newly built (or cleared) allocator holds: no mapping, every unit free in order.

    Args:
        model_config: (mapping entries, full units, SWA units).
        device: the allocator's device.
    Returns:
        The state (shared: compare with it, never change it)."""
    entries, full_units, swa_units = model_config
    mapping = torch.zeros(entries, dtype=torch.int64, device=device)
    mapping[-1] = -1
    every_unit = torch.arange(1, max(full_units, swa_units) + 1, dtype=torch.int64, device=device)
    return DeviceState(mapping, every_unit[:full_units], every_unit[:swa_units])


@functools.lru_cache(maxsize=64)
def every_index(first: int, entries: int, device: torch.device) -> Tensor:
    """`first` (-1 where the mapping has a sentinel, else 0) and every full slot after it:
    what translating the whole mapping reads."""
    return torch.arange(first, entries - 1, dtype=torch.int64, device=device)


@dataclass
class StepCheck:
    """The checks of one program (one machine instance) against one allocator."""

    allocator: Any
    driver: AllocatorDriver
    logged: int = 0
    """Calls of the driver's log that earlier steps already accounted for."""
    fresh: DeviceState | None = None
    backups: dict[int, DeviceState] = field(default_factory=dict)
    free_lengths: list[int] = field(default_factory=lambda: [0, 0])
    """Each pool's free units (ready and staged) in the model at the last step."""
    before_allocation: DeviceState | None = None
    """The state right before an allocation the model expects to fail (ATOMIC compares it)."""

    def expect_failed_allocation(self) -> None:
        """Call right before an allocation the model expects to fail."""
        self.before_allocation = DeviceState.capture(self.allocator)

    def after_step(
        self,
        model: SWAModel,
        result: Tensor | None,
        expectation: Expectation,
        live_tokens: Callable[[], set[int]],
        live_requests: Callable[[], Iterable[Request]],
        window: int | None,
    ) -> list[Violation]:
        """The violations of the step just taken (none if it agrees with the model)."""
        entries = self.driver.log[self.logged :]
        self.logged = len(self.driver.log)
        agrees = self._agrees(model, entries, result, expectation)
        previous, self.before_allocation = self.before_allocation, None
        if agrees:
            return []
        observed = observe(self.allocator, result)
        previous_state = None if previous is None else previous.as_lists()
        return check_step(observed, previous_state, model, expectation, live_tokens(), live_requests(), window)

    def at_end(
        self,
        model: SWAModel,
        live_tokens: Callable[[], set[int]],
        live_requests: Callable[[], Iterable[Request]],
        window: int | None,
    ) -> list[Violation]:
        """The violations of the program's final state: the whole of it against the model,
        and the model-free probes on it."""
        if self._whole_state_agrees(model):
            return []
        observed = observe(self.allocator, None)
        return check_step(observed, None, model, Expectation("(end)"), live_tokens(), live_requests(), window)

    # ---------------------------------------------------------------- per step
    def _agrees(self, model: SWAModel, entries: list[dict], result: Tensor | None, expectation: Expectation) -> bool:
        for entry in entries:
            if entry["call"] == "backup_state":
                self.backups[entry["args"][0]] = DeviceState.capture(self.allocator)
        if expectation.breach or not self._sizes_agree(model):
            return False
        whole = self._whole_state_target(model, entries)
        if whole is not None:
            self.free_lengths = [len(pool.free) + len(pool.staged) for pool in (model.full, model.swa)]
            return DeviceState.read(self.allocator).equals(whole) and expectation.result is None
        return self._touched_agree(model, self._touched_tokens(model, entries, result), result, expectation)

    def _sizes_agree(self, model: SWAModel) -> bool:
        full_available, swa_available, available, in_group = sizes_and_group(self.allocator)
        return (
            full_available == model.full.available()
            and swa_available == model.swa.available()
            and available in (None, model.available())  # None: the target has no available_size()
            and in_group == model.in_group
        )

    def _whole_state_target(self, model: SWAModel, entries: list[dict]) -> DeviceState | None:
        """The state a whole-state call of this step must have left (None: no such call)."""
        calls = [entry["call"] for entry in entries]
        if self.fresh is None or "clear" in calls:
            if self.fresh is None:
                config = (model.mapping_len, model.full.num_units, model.swa.num_units)
                self.fresh = fresh_state(config, self.allocator.full_to_swa_index_mapping.device)
            return self.fresh
        restores = [entry["args"][0] for entry in entries if entry["call"] == "restore_state"]
        if restores:
            return self.backups.get(restores[-1], self.fresh)
        return None

    @staticmethod
    def _touched_tokens(model: SWAModel, entries: list[dict], result: Tensor | None) -> list[int]:
        """The full slots the step's calls named or returned, as whole pages."""
        tokens: set[int] = set()
        for entry in entries:
            if entry["call"] in RELEASES:
                tokens.update(entry["args"][0])
        if result is not None:
            tokens.update(result.tolist())
        ps = model.page_size
        if ps > 1:
            tokens = {page * ps + offset for page in {token // ps for token in tokens} for offset in range(ps)}
        return sorted(token for token in tokens if 0 <= token < model.mapping_len - 1)

    def _touched_agree(
        self, model: SWAModel, tokens: list[int], result: Tensor | None, expectation: Expectation
    ) -> bool:
        """Mapping and translation at the touched slots and at the sentinel, the result, and
        each free list's ends as far as the step changed them, read back in one copy."""
        allocator = self.allocator
        mapping = allocator.full_to_swa_index_mapping  # token t's entry is at t in every layout
        sentinel = [-1] if has_sentinel(allocator) else []
        indices = torch.tensor([*sentinel, *tokens], dtype=torch.int64, device=mapping.device)
        at_touched = [*sentinel, *(model.mapping.get(token, 0) for token in tokens)]
        parts = [mapping[indices], allocator.translate_loc_from_full_to_swa(indices)]
        wanted = [at_touched, at_touched]
        staged_parts = []
        units_touched = len(tokens) // model.page_size + 2
        for index, (pool, name) in enumerate(((model.full, "full_attn_allocator"), (model.swa, "swa_attn_allocator"))):
            ready_part, staged_part = _split_free_list(getattr(allocator, name), len(pool.free))
            length = len(pool.free) + len(pool.staged)
            changed, self.free_lengths[index] = abs(length - self.free_lengths[index]) + units_touched, length
            ready = len(pool.free)
            window = min(ready, changed)
            parts += [ready_part[:window], ready_part[ready - window : ready]]
            wanted += [pool.free[:window], pool.free[ready - window : ready]]
            staged_parts.append((len(parts), pool.staged))
            parts.append(staged_part)
        if result is not None:
            parts.append(result.reshape(-1).to(torch.int64))
        host = torch.cat(parts).tolist()
        read, start = [], 0
        for part in parts:
            end = start + part.numel()
            read.append(host[start:end])
            start = end
        got_result = read.pop() if result is not None else None
        for position, staged in reversed(staged_parts):  # staged order is not observable
            if sorted(read.pop(position)) != sorted(staged):
                return False
        return read == wanted and got_result == expectation.result

    # ---------------------------------------------------------------- at the end
    def _probes_due(self, model: SWAModel) -> bool:
        """Whether the probes run on this final state: always on pools of up to
        PROBED_ENTRIES_PER_PROGRAM mapping entries, on one program in `stride` on larger
        ones (chosen by the program's length, so a program always gets the same answer)."""
        stride = -(-model.mapping_len // PROBED_ENTRIES_PER_PROGRAM)
        return len(self.driver.log) % stride == 0

    def _whole_state_agrees(self, model: SWAModel) -> bool:
        view = AllocatorView.of(self.allocator)
        if not self._sizes_agree(model) or (self._probes_due(model) and run_probes(view).read()):
            return False
        device = view.mapping.device
        expected = torch.zeros(model.mapping_len, dtype=torch.int64, device=device)
        if model.mapping:
            slots = torch.tensor(list(model.mapping), dtype=torch.int64, device=device)
            expected[slots] = torch.tensor(list(model.mapping.values()), dtype=torch.int64, device=device)
        expected[-1] = -1
        if has_sentinel(self.allocator):
            translated, translation = every_index(-1, model.mapping_len, device), expected.roll(1)
        else:  # the view put a -1 after the token entries; translating -1 is no call to make
            translated, translation = every_index(0, model.mapping_len, device), expected[:-1]
        return (
            torch.equal(view.mapping, expected)
            and torch.equal(self.allocator.translate_loc_from_full_to_swa(translated), translation)
            and _free_set_agrees(view.full_free, model.full)
            and _free_set_agrees(view.swa_free, model.swa)
        )


def _split_free_list(pool: Any, ready: int) -> tuple[Tensor, Tensor]:
    """A pool's free list cut after its first `ready` units (the model's ready part), without
    copying the list where the pool keeps its ready and staged units apart, as both the
    reference and sglang do."""
    ready_units, staged_units = getattr(pool, "free_pages", None), getattr(pool, "release_pages", None)
    if isinstance(ready_units, Tensor) and isinstance(staged_units, Tensor) and ready_units.numel() == ready:
        return ready_units, staged_units
    free = free_units(pool)
    return free[:ready], free[ready:]


def _free_set_agrees(free: Tensor, pool: PoolModel) -> bool:
    """The free list holds every unit the model has free, once, and nothing else (in any order)."""
    outside = pool.num_units + 1
    counts = torch.zeros(outside + 1, dtype=torch.int64, device=free.device)
    counts.index_add_(0, free.clamp(0, outside), torch.ones_like(free))
    expected = torch.ones(outside + 1, dtype=torch.int64, device=free.device)
    busy = [0, outside, *pool.allocated, *(pool.pending or ())]
    expected[torch.tensor(busy, dtype=torch.int64, device=free.device)] = 0
    return torch.equal(counts, expected)
