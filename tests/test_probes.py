"""Model-free probes: every probe fires on a deliberately broken allocator, stays quiet on the
reference allocator through random call sequences, reports readable items, never
synchronises with the host, and packs the same rows through torch and through Triton."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import decode_args, extend_args
from torch.overrides import TorchFunctionMode

from allocator import SWATokenToKVPoolAllocator
from canary.invariants import INVARIANTS, InvariantViolation, Name, Severity, Violation
from canary.probes import AllocatorView, ProbeInputError, ProbeResults, run_probes
from canary.probes.plan import CHECK_DETAILS
from properties.targets import mutants
from properties.targets.mutants import fixtures

MODEL_FREE = (Name.SENTINEL, Name.PAD, Name.NODUP, Name.CONSERVE, Name.SWA_LE_FULL, Name.AVAIL, Name.STALE, Name.PAGE)


def violations(allocator: object, **kwargs) -> dict[str, Violation]:
    return {v.invariant: v for v in run_probes(AllocatorView.of(allocator), **kwargs).read()}


def fired(allocator: object) -> set[str]:
    return set(violations(allocator))


def as_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def extend(allocator: SWATokenToKVPoolAllocator, prefix: int, seq: int, last_loc: int) -> list[int] | None:
    result = allocator.alloc_extend(*extend_args(allocator.device, [prefix], [seq], [last_loc]))
    return None if result is None else result.tolist()


def allocate(allocator: SWATokenToKVPoolAllocator, count: int) -> list[int] | None:
    """A new request of `count` tokens: alloc at page size 1, alloc_extend from 0 otherwise."""
    if allocator.page_size == 1:
        result = allocator.alloc(count)
        return None if result is None else result.tolist()
    return extend(allocator, 0, count, -1)


# ------------------------------------------------------------------ registry
def test_registry_names_the_spec_invariants_and_contract_with_their_severity() -> None:
    fatal = {Name.SENTINEL, Name.PAD, Name.NODUP, Name.CONSERVE, Name.SWA_LE_FULL, Name.ATOMIC, Name.AVAIL, Name.WINDOW}
    fatal |= {Name.CRASH, Name.HANG}
    guard = {Name.STALE, Name.PAGE, Name.XLAT, Name.LEAK, Name.CAPACITY, Name.CONTRACT, Name.DIFFERENTIAL}
    assert set(INVARIANTS) == fatal | guard
    assert {name for name, inv in INVARIANTS.items() if inv.severity is Severity.FATAL} == fatal
    assert {name for name, inv in INVARIANTS.items() if inv.model_free} == set(MODEL_FREE)
    assert all(inv.name == name and inv.description for name, inv in INVARIANTS.items())


# ------------------------------------------------------- broken allocators
@dataclass(frozen=True)
class Bug:
    allocator: type[SWATokenToKVPoolAllocator]
    page_size: int
    scenario: Callable[[SWATokenToKVPoolAllocator], None]
    fires: dict[str, list[int]]
    """The probes that must fire, with the items they must report."""
    need_sort: bool = False


def clear_after_use(allocator: SWATokenToKVPoolAllocator) -> None:
    allocator.free(as_tensor(allocate(allocator, 4), allocator.device))
    allocator.clear()


def clear_then_allocate(allocator: SWATokenToKVPoolAllocator) -> None:
    allocator.clear()
    allocate(allocator, 2)


def free_after_evicting_another(allocator: SWATokenToKVPoolAllocator) -> None:
    """Request A keeps its full slots but drops its SWA slots; then B is allocated and freed."""
    device = allocator.device
    allocator.free_swa(as_tensor(allocate(allocator, 8), device))
    allocator.free(as_tensor(allocate(allocator, 4), device))


def allocate_and_free(allocator: SWATokenToKVPoolAllocator) -> None:
    allocator.free(as_tensor(allocate(allocator, 4), allocator.device))


def evict_two_of_six(allocator: SWATokenToKVPoolAllocator) -> None:
    tokens = allocate(allocator, 6)
    allocator.free_swa(as_tensor(tokens[:2], allocator.device))


def evict_first_page(allocator: SWATokenToKVPoolAllocator) -> None:
    tokens = allocate(allocator, 3 * allocator.page_size)
    allocator.free_swa(as_tensor(tokens[: allocator.page_size], allocator.device))


def extend_mid_page(allocator: SWATokenToKVPoolAllocator) -> None:
    tokens = extend(allocator, 0, 6, -1)  # full pages 1, 2: tokens 4..9
    extend(allocator, 6, 7, tokens[-1])  # token 10 continues full page 2


BUGS = {
    Name.SENTINEL: Bug(mutants.ClearDropsSentinel, 1, clear_after_use, {Name.SENTINEL: [65]}),
    Name.PAD: Bug(fixtures.PadPageInFullFreeList, 1, clear_then_allocate, {Name.PAD: [0]}),
    Name.NODUP: Bug(fixtures.DoubleAppendsFullFrees, 1, free_after_evicting_another, {Name.NODUP: [9, 10, 11, 12]}),
    Name.CONSERVE: Bug(fixtures.StagedUnitsUncounted, 1, allocate_and_free, {Name.CONSERVE: [4]}, need_sort=True),
    "SWA_LE_FULL (peer freed)": Bug(
        fixtures.KeepsMappingOnFreeSwa, 1, evict_two_of_six, {Name.SWA_LE_FULL: [1, 2], Name.CONSERVE: [2]}
    ),
    "SWA_LE_FULL (orphan)": Bug(fixtures.LeaksSwaOnFreeSwa, 4, evict_first_page, {Name.SWA_LE_FULL: [1]}),
    Name.AVAIL: Bug(mutants.AvailableUsesMax, 1, allocate_and_free, {Name.AVAIL: [64]}),
    Name.STALE: Bug(fixtures.FreeSkipsSwaPeers, 1, free_after_evicting_another, {Name.STALE: [9, 10, 11, 12]}),
    Name.PAGE: Bug(fixtures.FreshSwaPagesOnExtend, 4, extend_mid_page, {Name.PAGE: [10]}),
}


def build(cls: type[SWATokenToKVPoolAllocator], bug: Bug, device: torch.device) -> SWATokenToKVPoolAllocator:
    return cls(64, 32 if bug.page_size == 1 else 64, bug.page_size, torch.float16, device, need_sort=bug.need_sort)


@pytest.mark.parametrize("bug", BUGS.values(), ids=BUGS.keys())
def test_each_probe_catches_a_broken_allocator(bug: Bug, swa_device: torch.device) -> None:
    allocator = build(bug.allocator, bug, swa_device)
    bug.scenario(allocator)
    found = violations(allocator)
    assert {name: v.indices for name, v in found.items()} == bug.fires
    assert all(v.count == len(v.indices) for v in found.values())


@pytest.mark.parametrize("bug", BUGS.values(), ids=BUGS.keys())
def test_the_same_calls_keep_the_reference_quiet(bug: Bug, swa_device: torch.device) -> None:
    allocator = build(SWATokenToKVPoolAllocator, bug, swa_device)
    bug.scenario(allocator)
    assert fired(allocator) == set()


def test_every_model_free_probe_has_a_broken_allocator() -> None:
    caught = {name for bug in BUGS.values() for name in bug.fires}
    assert caught == set(MODEL_FREE)


def test_orphan_check_waits_for_the_end_of_a_free_group(swa_device: torch.device) -> None:
    reference = SWATokenToKVPoolAllocator(64, 32, 1, torch.float16, swa_device)
    leaky = fixtures.LeaksSwaOnFreeSwa(64, 32, 1, torch.float16, swa_device)
    for allocator in (reference, leaky):
        tokens = as_tensor(allocate(allocator, 6), swa_device)
        allocator.free_group_begin()
        allocator.free_swa(tokens[:3])
        assert AllocatorView.of(allocator).in_free_group
        assert fired(allocator) == set()  # deferred SWA units are neither free nor referenced yet
        allocator.free_group_end()
    assert fired(reference) == set()
    assert violations(leaky)[Name.SWA_LE_FULL].indices == [1, 2, 3]


# --------------------------------------------------- hand-corrupted states
def corrupt(
    page_size: int = 1,
    mapping: dict[int, int] | None = None,
    full_free: list[int] | None = None,
    swa_free: list[int] | None = None,
    **sizes: int,
) -> AllocatorView:
    """A view of a fresh 32/16-slot allocator with the given entries and free lists swapped in."""
    allocator = SWATokenToKVPoolAllocator(32, 16, page_size, torch.float16, "cpu")
    view = AllocatorView.of(allocator)
    table = view.mapping.clone()
    for token, peer in (mapping or {}).items():
        table[token] = peer
    changes = {"mapping": table, **sizes}
    if full_free is not None:
        changes["full_free"] = torch.tensor(full_free, dtype=torch.int64)
    if swa_free is not None:
        changes["swa_free"] = torch.tensor(swa_free, dtype=torch.int64)
    return replace(view, **changes)


def test_pad_reports_each_way_the_padding_unit_is_used() -> None:
    view = corrupt(4, mapping={1: 9, 9: 2}, swa_free=[0, 1, 2, 3])
    pad = {v.invariant: v for v in run_probes(view, [Name.PAD]).read()}[Name.PAD]
    assert (pad.count, pad.indices) == (3, [0, 1, 9])
    assert pad.detail == (
        "SWA free list holds padding unit 0 (1), then full tokens of padding page 0 have an SWA peer (1), "
        "then full tokens map into SWA padding page 0 (1)"
    )


def test_nodup_reports_repeated_negative_and_too_large_units() -> None:
    view = corrupt(full_free=list(range(1, 30)) + [5, 5, -7, 99, 0])
    nodup = run_probes(view, [Name.NODUP]).read()[0]
    assert (nodup.count, nodup.indices) == (4, [-1, 0, 5, 33])


def test_conserve_checks_counts_and_sizes_on_both_pools() -> None:
    # 15 free SWA units + 2 referenced > 16; sizes say 40 / 20 free slots against 32 and 16.
    view = corrupt(mapping={3: 4, 7: 5}, full_available=40, swa_available=20)
    conserve = run_probes(view, [Name.CONSERVE]).read()[0]
    # full: 40 > 32 (by 8) and 40 != 32 free (by 8); SWA: 20 > 16 (by 4), 20 != 16 (by 4);
    # counts: full 32 free + 2 used exceed 32 by 2, SWA likewise by 2.
    assert (conserve.count, conserve.indices) == (6, [8, 4, 8, 4, 2, 2])
    assert conserve.detail == (
        "full_available_size() exceeds size_full by (1), then swa_available_size() exceeds size_swa by (1), "
        "then full_available_size() differs from the free full units x page_size by (1), "
        "then swa_available_size() differs from the free SWA units x page_size by (1), "
        "then full units free + in use exceed the pool by (1), then SWA units free + in use exceed the pool by (1)"
    )


def test_swa_le_full_reports_shared_free_and_missing_peers() -> None:
    # Tokens 1 and 2 share SWA slot 5; token 3 points past the pool, token 4 below it; SWA
    # slot 6 is referenced but also free; every other SWA slot except 5 is free.
    swa_free = [unit for unit in range(1, 17) if unit != 5]
    view = corrupt(mapping={1: 5, 2: 5, 3: 17, 4: -2, 8: 6}, swa_free=swa_free)
    found = run_probes(view, [Name.SWA_LE_FULL]).read()[0]
    assert (found.count, found.indices) == (4, [5, 3, 4, 8])


def test_page_reports_tokens_on_another_page_or_offset() -> None:
    # Full page 1 (tokens 4..7): 4 -> 8, 5 -> 9, 7 -> 11 (fine), 6 -> 14 (another SWA page).
    # Full page 2 (tokens 8..11): 8 -> 13, 9 -> 14: same page, offsets shifted by one.
    view = corrupt(4, mapping={4: 8, 5: 9, 6: 14, 7: 11, 8: 13, 9: 14})
    page = run_probes(view, [Name.PAGE]).read()[0]
    assert (page.count, page.indices) == (3, [6, 8, 9])


def test_page_is_quiet_at_page_size_one() -> None:
    view = corrupt(mapping={1: 3, 2: 1})
    assert run_probes(view, [Name.PAGE]).read() == []


# ------------------------------------------------------ packing and reports
def test_first_indices_come_in_order_and_the_count_is_complete() -> None:
    view = corrupt(mapping={token: 1 for token in range(1, 21)}, full_free=list(range(1, 33)))
    stale = run_probes(view, [Name.STALE], max_indices=3).read()[0]
    assert (stale.count, stale.indices) == (20, [1, 2, 3])
    assert stale.explain() == (
        "GUARD STALE: 20 tokens of free full units still map to an SWA slot: [1, 2, 3] (first 3 shown)"
    )
    only_count = run_probes(view, [Name.STALE], max_indices=0)
    assert only_count.packed.shape == (1, 1)
    assert only_count.read()[0].count == 20


def test_explain_is_one_readable_line() -> None:
    swa_free = [unit for unit in range(1, 17) if unit != 5]
    found = run_probes(corrupt(mapping={1: 5, 2: 5}, swa_free=swa_free), [Name.SWA_LE_FULL]).read()[0]
    assert found.explain() == "FATAL SWA_LE_FULL: 1 SWA slots are peers of two or more full tokens: [5]"


def test_from_packed_round_trips_a_copied_tensor() -> None:
    view = corrupt(4, mapping={1: 9, 4: 8, 5: 13, -1: 0}, swa_free=[0, 1, 2])
    results = run_probes(view, max_indices=4)
    copied = ProbeResults.from_packed(results.names, results.packed.clone())
    assert copied.read() == results.read()
    assert {v.invariant for v in copied.read()} >= {Name.SENTINEL, Name.PAD, Name.PAGE, Name.SWA_LE_FULL}
    assert results[Name.PAD].tolist() == results.packed[results.names.index(Name.PAD)].tolist()
    with pytest.raises(ProbeInputError, match="shape"):
        ProbeResults.from_packed(results.names[:-1], results.packed)
    with pytest.raises(ProbeInputError, match="unknown invariant"):
        ProbeResults.from_packed(("NOPE",) + results.names[1:], results.packed)


def test_names_select_model_free_probes_in_the_order_given() -> None:
    view = corrupt()
    results = run_probes(view, [Name.STALE, Name.WINDOW, Name.PAD, Name.STALE])
    assert results.names == (Name.STALE, Name.PAD)
    assert results.packed.shape == (2, 9)
    assert run_probes(view).names == MODEL_FREE
    with pytest.raises(ProbeInputError, match="unknown invariant 'PADDING'"):
        run_probes(view, ["PADDING"])


def test_invariant_violation_lists_all_and_names_the_most_severe() -> None:
    stale = Violation(Name.STALE, Severity.GUARD, 1, [3], "tokens of free full units still map to an SWA slot")
    pad = Violation(Name.PAD, Severity.FATAL, 2, [0, 1], "full tokens of padding page 0 have an SWA peer")
    error = InvariantViolation([stale, pad])
    assert (error.invariant, error.severity) == (Name.PAD, Severity.FATAL)
    assert str(error).splitlines() == [stale.explain(), pad.explain()]
    assert isinstance(error, AssertionError)


# ----------------------------------------------------------------- the view
def test_view_reads_an_sglang_like_allocator() -> None:
    allocator = SWATokenToKVPoolAllocator(32, 16, 1, torch.float16, "cpu", need_sort=True)
    allocator.free(allocator.alloc(3))
    full, swa = allocator.full_attn_allocator, allocator.swa_attn_allocator
    like = SimpleNamespace(
        full_to_swa_index_mapping=allocator.full_to_swa_index_mapping,
        full_attn_allocator=SimpleNamespace(
            free_pages=full.free_pages, release_pages=full.release_pages, is_not_in_free_group=False
        ),
        swa_attn_allocator=SimpleNamespace(free_pages=swa.free_pages, release_pages=swa.release_pages),
        page_size=1,
        size_full=32,
        size_swa=16,
        full_available_size=allocator.full_available_size,
        swa_available_size=allocator.swa_available_size,
        available_size=allocator.available_size,
    )
    view = AllocatorView.of(like)
    assert view.in_free_group
    assert view.full_free.tolist() == AllocatorView.of(allocator).full_free.tolist()
    assert run_probes(view).read() == []


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mapping=torch.zeros(34, dtype=torch.int32)), "1-D int64"),
        (dict(mapping=torch.zeros(30, dtype=torch.int64)), "size_full \\+ page_size \\+ 1"),
        (dict(available=torch.tensor(3)), "available must be an int"),
        (dict(size_swa=15, page_size=2), "multiple of page_size"),
        (dict(full_free=[1, 2]), "1-D int64"),
    ],
)
def test_bad_views_are_rejected_with_a_readable_error(change: dict, message: str) -> None:
    with pytest.raises(ProbeInputError, match=message):
        replace(corrupt(), **change)


def test_view_of_something_else_is_rejected() -> None:
    with pytest.raises(ProbeInputError, match="not an SWA allocator"):
        AllocatorView.of(object())
    with pytest.raises(ProbeInputError, match="max_indices"):
        run_probes(corrupt(), max_indices=-1)


# -------------------------------------------------- no host synchronisation
class NoHostSync(TorchFunctionMode):
    """Fails on every tensor operation that reads device data back to the host or has an
    output whose shape depends on the data."""

    FORBIDDEN = {
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
        torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
        torch.Tensor.cpu, torch.Tensor.numpy, torch.unique, torch.Tensor.unique, torch.masked_select,
        torch.Tensor.masked_select, torch.bincount, torch.Tensor.bincount, torch.argwhere, torch.equal,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation: {func.__name__}")
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _has_mask(args[1]):
            raise AssertionError("host synchronisation: boolean-mask indexing")
        if func is torch.Tensor.__setitem__ and not isinstance(args[2], torch.Tensor):
            # On CUDA, tensor[i] = number copies the number from the host and synchronises.
            raise AssertionError("host synchronisation: a Python number assigned through indexing")
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and "output_size" not in (kwargs or {}):
            raise AssertionError("host synchronisation: repeat_interleave without output_size")
        return func(*args, **(kwargs or {}))


def _has_mask(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


def test_the_sync_guard_catches_reads_back() -> None:
    values = torch.arange(4)
    def assign() -> None:
        values[0] = 7

    for read_back in (lambda: values[1].item(), lambda: bool(values.sum()), lambda: values[values > 1], assign):
        with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
            read_back()


@pytest.mark.parametrize("bug", BUGS.values(), ids=BUGS.keys())
def test_probes_never_read_back_on_cpu(bug: Bug) -> None:
    allocator = build(bug.allocator, bug, torch.device("cpu"))
    bug.scenario(allocator)
    with NoHostSync():
        results = run_probes(AllocatorView.of(allocator))
    assert {v.invariant for v in results.read()} == set(bug.fires)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bug", BUGS.values(), ids=BUGS.keys())
def test_probes_never_synchronise_on_cuda(bug: Bug) -> None:
    allocator = build(bug.allocator, bug, torch.device("cuda"))
    bug.scenario(allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = run_probes(AllocatorView.of(allocator))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert {v.invariant for v in results.read()} == set(bug.fires)


# ---------------------------------------- the reference stays quiet (random)
@dataclass
class Request:
    tokens: list[int]
    evicted: int = 0
    """Positions before this one have had their SWA slots released."""


@dataclass
class Driver:
    """Drives the reference allocator like a server would, with random but legal calls."""

    allocator: SWATokenToKVPoolAllocator
    window: int
    requests: list[Request] = field(default_factory=list)

    @property
    def ps(self) -> int:
        return self.allocator.page_size

    def start(self, length: int) -> None:
        tokens = allocate(self.allocator, length)
        if tokens is not None:
            self.requests.append(Request(tokens))

    def extend(self, which: int, length: int) -> None:
        request = self._pick(which)
        if request is None:
            return
        if self.ps == 1:
            tokens = self.allocator.alloc(length)
            tokens = None if tokens is None else tokens.tolist()
        else:
            prefix = len(request.tokens)
            tokens = extend(self.allocator, prefix, prefix + length, request.tokens[-1])
        if tokens is not None:
            request.tokens += tokens
            self.evict(which)

    def decode(self, which: list[int]) -> None:
        batch = list({id(r): r for r in (self._pick(w) for w in which) if r is not None}.values())
        if not batch:
            return
        if self.ps == 1:
            result = self.allocator.alloc(len(batch))
        else:
            seq = [len(r.tokens) + 1 for r in batch]
            last_loc = [r.tokens[-1] for r in batch]
            result = self.allocator.alloc_decode(*decode_args(self.allocator.device, seq, last_loc))
        if result is not None:
            for request, token in zip(batch, result.tolist()):
                request.tokens.append(token)
            for which_one in which:
                self.evict(which_one)

    def evict(self, which: int) -> None:
        """Release the SWA slots of the pages that left the window (after every extend and
        decode, as a server does)."""
        request = self._pick(which)
        if request is None:
            return
        floor = max(0, len(request.tokens) - self.window) // self.ps * self.ps
        if floor > request.evicted:
            self.allocator.free_swa(as_tensor(request.tokens[request.evicted : floor], self.allocator.device))
            request.evicted = floor

    def finish(self, which: int) -> None:
        request = self._pick(which)
        if request is not None:
            self.requests.remove(request)
            self.allocator.free(as_tensor(request.tokens, self.allocator.device))

    def _pick(self, which: int) -> Request | None:
        return self.requests[which % len(self.requests)] if self.requests else None


lengths = st.integers(1, 12)
picks = st.integers(0, 7)
start = st.tuples(st.just("start"), lengths)
extend_step = st.tuples(st.just("extend"), picks, lengths)
decode_step = st.tuples(st.just("decode"), st.lists(picks, min_size=1, max_size=3))
steps = st.one_of(
    start,
    extend_step,
    extend_step,
    decode_step,
    decode_step,
    decode_step,
    st.tuples(st.just("finish"), picks),
    st.tuples(
        st.just("group"), st.lists(st.tuples(st.sampled_from(["evict", "finish"]), picks), min_size=1, max_size=3)
    ),
    st.tuples(st.just("clear")),
    st.tuples(st.just("restore"), st.lists(st.one_of(start, extend_step), max_size=2)),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    page_size=st.sampled_from([1, 2, 4, 16]),
    full_slots=st.integers(32, 96),
    swa_slots=st.integers(16, 64),
    window=st.integers(1, 8),
    need_sort=st.booleans(),
    first_requests=st.lists(lengths, min_size=1, max_size=4),
    program=st.lists(steps, min_size=4, max_size=20),
)
def test_reference_keeps_every_probe_quiet(
    page_size: int,
    full_slots: int,
    swa_slots: int,
    window: int,
    need_sort: bool,
    first_requests: list[int],
    program: list,
) -> None:
    def whole_pages(slots: int, at_least: int) -> int:
        return max(-(-slots // page_size), at_least) * page_size

    allocator = SWATokenToKVPoolAllocator(
        whole_pages(full_slots, 6), whole_pages(swa_slots, 4), page_size, torch.float16, "cpu", need_sort=need_sort
    )
    driver = Driver(allocator, window=window)
    for length in first_requests:
        driver.start(length)
    for step in program:
        run_step(driver, step)
        assert run_probes(AllocatorView.of(allocator)).read() == [], step


def run_step(driver: Driver, step: tuple) -> None:
    kind, *args = step
    if kind == "group":
        driver.allocator.free_group_begin()
        for inner_kind, which in args[0]:
            getattr(driver, inner_kind)(which)
            assert run_probes(AllocatorView.of(driver.allocator)).read() == [], (step, inner_kind)
        driver.allocator.free_group_end()
    elif kind == "clear":
        driver.allocator.clear()
        driver.requests.clear()
    elif kind == "restore":
        saved, requests = driver.allocator.backup_state(), [replace(r, tokens=list(r.tokens)) for r in driver.requests]
        for inner in args[0]:
            run_step(driver, inner)
        driver.allocator.restore_state(saved)
        driver.requests = requests
    else:
        getattr(driver, kind)(*args)


# ------------------------------------------- the torch and Triton paths agree
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
# The Triton probes run compiled on CUDA, or interpreted on CPU when TRITON_INTERPRET=1 was set
# before the process started (never both in one process: the interpreter patches triton for good).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
can_run_triton = pytest.mark.skipif(
    not (HAS_TRITON and (HAS_CUDA or INTERPRET)),
    reason="the Triton kernels need CUDA, or on CPU their own run: TRITON_INTERPRET=1 pytest -m triton",
)
PROBE_DEVICE = torch.device("cuda" if HAS_CUDA and not INTERPRET else "cpu")


@pytest.fixture(params=[None, 8], ids=["tiles", "small-tiles"])
def triton_kernels(request: pytest.FixtureRequest):
    """The Triton probes, built the way this process runs them. With small tiles every pass
    spans many blocks and the prefix sums many chunks."""
    kernels = importlib.import_module("canary.probes.triton_backend")
    assert kernels.INTERPRETED == INTERPRET
    patch = pytest.MonkeyPatch()
    if request.param is not None:
        patch.setattr(kernels, "_TILE", request.param)
        patch.setattr(kernels, "_CHUNK", 2)
    yield kernels
    patch.undo()


def random_view(
    seed: int, page_size: int, full_units: int, swa_units: int, device: torch.device = PROBE_DEVICE
) -> AllocatorView:
    """An allocator state with every kind of damage: entries that are zero, valid, shared,
    negative, past the pool or huge; pages that are whole or broken; free lists with repeats,
    padding, negative and too large units; sizes that agree or not; a sentinel that may be
    wrong; sometimes inside a free group."""
    generator = torch.Generator().manual_seed(seed)

    def pick(count: int, low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high, (count,), generator=generator)

    def chance(count: int, p: float) -> torch.Tensor:
        return torch.rand(count, generator=generator) < p

    ps, entries, swa_slots = page_size, (full_units + 1) * page_size, (swa_units + 1) * page_size
    garbage = torch.tensor([-1, -2, -7, swa_slots, swa_slots + 5, 2**62, -(2**62)])
    mapping = torch.where(chance(entries, 0.5), 0, pick(entries, 1, swa_slots))
    mapping = torch.where(chance(entries, 0.1), garbage[pick(entries, 0, len(garbage))], mapping)
    if ps > 1:  # whole pages: full page r -> some SWA page at the same offsets, some tokens held
        pages = (pick(full_units + 1, 0, swa_units + 1) * ps).repeat_interleave(ps) + torch.arange(entries) % ps
        whole = chance(full_units + 1, 0.5).repeat_interleave(ps) & chance(entries, 0.8)
        mapping = torch.where(whole, pages, mapping)
    sentinel = garbage[pick(1, 0, len(garbage))] if bool(chance(1, 0.2)) else torch.tensor([-1])
    mapping = torch.cat((mapping, sentinel))

    def free_list(units: int) -> torch.Tensor:
        values = pick(int(pick(1, 0, units + 4)), 1, units + 1)
        return torch.where(chance(values.numel(), 0.1), pick(values.numel(), -3, units + 4), values)

    full_free, swa_free = free_list(full_units), free_list(swa_units)
    full_available = len(full_free) * ps if bool(chance(1, 0.8)) else int(pick(1, 0, full_units * ps + 5))
    swa_available = len(swa_free) * ps if bool(chance(1, 0.8)) else int(pick(1, 0, swa_units * ps + 5))
    available = min(full_available, swa_available) if bool(chance(1, 0.8)) else int(pick(1, 0, 40))
    return AllocatorView(
        mapping=mapping.to(device),
        full_free=full_free.to(device),
        swa_free=swa_free.to(device),
        page_size=ps,
        size_full=full_units * ps,
        size_swa=swa_units * ps,
        full_available=full_available,
        swa_available=swa_available,
        available=available,
        in_free_group=bool(chance(1, 0.3)),
    )


names_or_all = st.one_of(st.none(), st.lists(st.sampled_from(list(INVARIANTS)), max_size=8))


@pytest.mark.triton
@can_run_triton
@settings(
    max_examples=300 if HAS_CUDA else 25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**31 - 1),
    page_size=st.sampled_from([1, 2, 3, 4, 16]),
    full_units=st.integers(1, 80),
    swa_units=st.integers(1, 50),
    names=names_or_all,
    max_indices=st.sampled_from([0, 1, 3, 8, 20]),
)
def test_triton_packs_the_rows_torch_packs(
    triton_kernels, seed: int, page_size: int, full_units: int, swa_units: int, names, max_indices: int
) -> None:
    view = random_view(seed, page_size, full_units, swa_units)
    expected = run_probes(view, names, max_indices, impl="torch")
    fused = run_probes(view, names, max_indices, impl="triton")
    assert fused.names == expected.names
    assert fused.packed.device == view.mapping.device
    assert torch.equal(fused.packed, expected.packed)


def test_random_views_break_every_check() -> None:
    """The views the agreement test draws exercise every check of every model-free probe."""
    seen: dict[str, set[int]] = {name: set() for name in MODEL_FREE}
    for seed in range(60):
        view = random_view(seed, page_size=[1, 4][seed % 2], full_units=12, swa_units=10, device=torch.device("cpu"))
        for found in run_probes(view, max_indices=64, impl="torch").read():
            seen[found.invariant] |= {check for check, phrase in enumerate(CHECK_DETAILS[found.invariant])
                                      if phrase in found.detail}
    assert seen == {name: set(range(len(CHECK_DETAILS[name]))) for name in MODEL_FREE}


def test_impl_is_checked() -> None:
    with pytest.raises(ProbeInputError, match="impl must be one of"):
        run_probes(corrupt(), impl="cuda")


@requires_triton
def test_compiled_triton_needs_cuda_tensors() -> None:
    kernels = importlib.import_module("canary.probes.triton_backend")
    if kernels.INTERPRETED:
        pytest.skip("kernels were built for the interpreter in this process")
    with pytest.raises(ProbeInputError, match="needs CUDA tensors"):
        run_probes(corrupt(), impl="triton")


@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("bug", BUGS.values(), ids=BUGS.keys())
def test_each_path_catches_each_bug_without_synchronising(bug: Bug, impl: str) -> None:
    allocator = build(bug.allocator, bug, torch.device("cuda"))
    bug.scenario(allocator)
    view = AllocatorView.of(allocator)
    run_probes(view, impl=impl)  # compiles and builds constants outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = run_probes(view, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert {name: v.indices for name, v in ((v.invariant, v) for v in results.read())} == bug.fires


@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_a_captured_check_sees_the_state_at_each_replay(impl: str, page_size: int) -> None:
    """Captured once in a CUDA graph, the probes re-read the mapping and free lists at every
    replay: corrupting them in place shows up in the next replay as in an eager call."""
    view = random_view(7, page_size, full_units=300, swa_units=200)
    clean = replace(view, mapping=torch.zeros_like(view.mapping), full_free=torch.zeros_like(view.full_free),
                    swa_free=torch.zeros_like(view.swa_free))
    clean.mapping[-1:].fill_(-1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_probes(clean, impl=impl)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_probes(clean, impl=impl)
    graph.replay()
    assert torch.equal(captured.packed, run_probes(clean, impl="torch").packed)
    for target, source in ((clean.mapping, view.mapping), (clean.full_free, view.full_free),
                           (clean.swa_free, view.swa_free)):
        target.copy_(source)
    graph.replay()
    assert torch.equal(captured.packed, run_probes(clean, impl="torch").packed)
    assert captured.packed[:, 0].sum().item() > 0
