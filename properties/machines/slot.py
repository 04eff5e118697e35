"""The slot-level machine: page size 1, holdings of `alloc`, freed whole or in parts."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    consumes,
    initialize,
    multiple,
    rule,
)

from properties.machines.base import ENDINGS, AllocatorMachine


@dataclass
class Holding:
    """Slots from one `alloc`; the first `swa_released` of them have had their SWA peers freed."""

    tokens: list[int]
    swa_released: int = 0


class SlotMachine(AllocatorMachine):
    """Page size 1, slot-level calls: alloc, free, free_swa on part of a holding, free_full."""

    holdings = Bundle("holdings")
    handles: dict[int, Holding]

    @initialize(size=st.integers(1, 24), size_swa=st.integers(1, 24), need_sort=st.booleans())
    def setup(self, size: int, size_swa: int, need_sort: bool) -> None:
        self.start(size, size_swa, 1, need_sort)

    def live_tokens(self) -> set[int]:
        return {token for holding in self.handles.values() for token in holding.tokens}

    @rule(target=holdings, need=st.integers(0, 10))
    def alloc(self, need: int) -> int | MultipleResults[int]:
        return self.hold(need)

    @rule(target=holdings, pool=st.sampled_from(("full", "swa")))
    def alloc_filling_pool(self, pool: str) -> int | MultipleResults[int]:
        """Allocate as many slots as `pool` has free: it empties if the other can serve it."""
        return self.hold(getattr(self.model, pool).available())

    def hold(self, need: int) -> int | MultipleResults[int]:
        """One alloc(need), kept as a holding."""
        live_before = self.live_tokens()
        slots = self.allocate("alloc", (need,), self.model.alloc(need), live_before)
        return multiple() if slots is None else self.new_handle(Holding(slots))

    @rule(handle=consumes(holdings), ending=st.sampled_from(ENDINGS))
    def finish(self, handle: int, ending: str) -> None:
        """Release the whole holding (ENDINGS says how)."""
        holding = self.handles.pop(handle, None)
        if holding is not None:
            self.end_tokens(holding.tokens, holding.swa_released, ending)

    @rule()
    def advance_windows(self) -> None:
        """Every holding's window slides by one token: one free_swa of each holding's oldest
        SWA peer, batched in one call."""
        oldest = [holding for holding in self.handles.values() if holding.swa_released < len(holding.tokens)]
        if oldest:
            self.release("free_swa", [holding.tokens[holding.swa_released] for holding in oldest])
        for holding in oldest:
            holding.swa_released += 1

    @rule(handle=holdings, count=st.integers(1, 10))
    def free_swa(self, handle: int, count: int) -> None:
        holding = self.handles.get(handle)
        if holding is None:
            return
        span = holding.tokens[holding.swa_released : holding.swa_released + count]
        self.release("free_swa", span)
        holding.swa_released += len(span)
