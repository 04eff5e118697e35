"""The one comparison of an allocator with what it should be.

After a call, an allocator shows what the call returned, its three available sizes, the
mapping, each pool's free list and whether a free group is open (`AllocatorState`). Whatever
says what it should show (the reference model after each step, a second allocator given the
same calls, a recorded golden trace, the reference's answers embedded in an exported finding)
is put in the same form, and `differences` lists every way the two disagree.

A free list is compared as its ready units, in order, then its staged units in any order: a
merge sorts the staged units before any of them is handed out, so their order is not
observable. An expectation that does not know the order at all (a second allocator's free
units) puts every unit in `staged`, which compares the two as multisets. Fields an
expectation leaves None (a golden trace records no free lists) are not compared.

This module needs only torch and the probes' view: exported findings import it without
Hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from allocator.interface import SWAAllocator
from canary.probes import AllocatorView

SHOWN = 8
"""Items shown per difference."""


@dataclass(frozen=True)
class FreeList:
    ready: list[int]
    """Units handed out first, in order."""
    staged: list[int] = field(default_factory=list)
    """Units waiting for a merge (need_sort), in any order."""

    def unordered(self) -> FreeList:
        """The same units with no order known."""
        return FreeList([], self.ready + self.staged)


@dataclass(frozen=True)
class AllocatorState:
    result: list[int] | None
    """What the call returned (None: a failed allocation, or a call that returns nothing)."""
    sizes: tuple[int, int, int]
    """(full_available_size(), swa_available_size(), available_size())."""
    mapping: list[int]
    """The whole full-to-SWA mapping, sentinel last."""
    full_free: FreeList | None = None
    swa_free: FreeList | None = None
    in_free_group: bool | None = None


def read_state(allocator: SWAAllocator, result: torch.Tensor | None) -> AllocatorState:
    """What `allocator` shows after a call that returned `result` (free lists in their order).

    Args:
        allocator: any allocator with the SPEC §1 interface.
        result: the call's return value.

    Returns:
        Its state, read back to the host.
    """
    view = AllocatorView.of(allocator)
    return AllocatorState(
        result=None if result is None else result.cpu().tolist(),
        sizes=(view.full_available, view.swa_available, view.available),
        mapping=view.mapping.cpu().tolist(),
        full_free=FreeList(view.full_free.cpu().tolist()),
        swa_free=FreeList(view.swa_free.cpu().tolist()),
        in_free_group=view.in_free_group,
    )


def dense_mapping(length: int, pairs: list[tuple[int, int]] | list[list[int]]) -> list[int]:
    """The mapping of `length` entries whose nonzero entries are `pairs` (full slot, SWA slot),
    sentinel -1 last."""
    mapping = [0] * length
    for full, swa in pairs:
        mapping[full] = swa
    mapping[-1] = -1
    return mapping


def differences(
    actual: AllocatorState, expected: AllocatorState, names: tuple[str, str] = ("the allocator", "the reference")
) -> list[str]:
    """Every way `actual` differs from `expected`, one readable line each (empty: they agree).

    Args:
        actual: what the allocator shows.
        expected: what it should show; None fields are not compared.
        names: how the two are called in the lines.

    Returns:
        The differences, in the order result, sizes, mapping, free lists, free group.
    """
    found = []
    if actual.result != expected.result:
        found.append(f"returned {_both(names, actual.result, expected.result)}")
    if actual.sizes != expected.sizes:
        found.append(f"sizes (full, SWA, available) {_both(names, actual.sizes, expected.sizes)}")
    found += _mapping_differences(actual.mapping, expected.mapping, names)
    pools = (("full", actual.full_free, expected.full_free), ("swa", actual.swa_free, expected.swa_free))
    for pool, got, want in pools:
        if want is not None and got is not None and _free_list_differs(got, want):
            found.append(f"{pool} free list {_both(names, _shown(got), _shown(want))}")
    if expected.in_free_group is not None and actual.in_free_group != expected.in_free_group:
        found.append(f"free group open {_both(names, actual.in_free_group, expected.in_free_group)}")
    return found


def _mapping_differences(got: list[int], want: list[int], names: tuple[str, str]) -> list[str]:
    if got == want:
        return []
    if len(got) != len(want):
        return [f"mapping length {_both(names, len(got), len(want))}"]
    wrong = [index for index, (a, b) in enumerate(zip(got, want)) if a != b][:SHOWN]
    entries = [got[index] for index in wrong], [want[index] for index in wrong]
    return [f"mapping differs at {wrong} {_both(names, *entries)}"]


def _free_list_differs(got: FreeList, want: FreeList) -> bool:
    units = got.ready + got.staged
    ready = len(want.ready)
    return units[:ready] != want.ready or sorted(units[ready:]) != sorted(want.staged)


def _shown(free: FreeList) -> str:
    if not free.ready:
        return f"{_units(sorted(free.staged))} in any order"
    if not free.staged:
        return _units(free.ready)
    return f"{_units(free.ready)} then staged {_units(sorted(free.staged))}"


def _units(units: list[int]) -> str:
    return f"{str(units[:SHOWN])[:-1]}, ...]" if len(units) > SHOWN else str(units)


def _both(names: tuple[str, str], got: object, want: object) -> str:
    return f"({names[0]} {got}, {names[1]} {want})"
