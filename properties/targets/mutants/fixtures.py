"""Fixtures: one-bug allocators for the unit tests of one probe, one runner or one contract rule.

Each is the reference allocator with one bug, small enough that a handful of ordinary calls
shows it, and its docstring says what goes wrong. They are not selfcheck mutants (`MUTANTS`):
they are not drawn from a report, and some (`GroupEndWithoutBeginIsSilent`) are sglang's own
behaviour that a contract restriction allows. Bugs the catalogue already has are taken from it.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from allocator import PagedTokenToKVPoolAllocator, SWATokenToKVPoolAllocator


class PadPageInFullFreeList(SWATokenToKVPoolAllocator):
    """clear() rebuilds the full free list off by one: units 0..N-1 instead of 1..N."""

    def clear(self) -> None:
        super().clear()
        pool = self.full_attn_allocator
        pool.free_pages = torch.arange(pool.num_pages, dtype=torch.int64, device=self.device)


class DoubleAppendsFullFrees(SWATokenToKVPoolAllocator):
    """The full pool appends every freed unit to its free list twice."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pool = self.full_attn_allocator
        release_once = pool.return_units

        def release_twice(units: torch.Tensor) -> None:
            release_once(units)
            release_once(units)

        pool.return_units = release_twice  # type: ignore[method-assign]  # this instance only


class StagedUnitsUncounted(SWATokenToKVPoolAllocator):
    """full_available_size() counts only the ready free list, not the units staged by
    need_sort, so it under-reports after a free."""

    def full_available_size(self) -> int:
        return self.full_attn_allocator.free_pages.numel() * self.page_size


class KeepsMappingOnFreeSwa(SWATokenToKVPoolAllocator):
    """free_swa (and free) release the SWA peers but leave the mapping pointing at them."""

    def _release_swa_peers(self, free_index: torch.Tensor) -> None:
        mapping = self.full_to_swa_index_mapping
        kept = mapping.clone()
        super()._release_swa_peers(free_index)
        mapping.copy_(kept)


class LeaksSwaOnFreeSwa(SWATokenToKVPoolAllocator):
    """free_swa zeroes the mapping of the SWA peers but never returns them to the SWA pool."""

    def free_swa(self, free_index: torch.Tensor) -> None:
        tokens = free_index
        if self.page_size > 1:
            tokens = self._tokens_of_units(torch.unique(free_index // self.page_size))
        self.full_to_swa_index_mapping[tokens] = 0


class FreeSkipsSwaPeers(SWATokenToKVPoolAllocator):
    """free() releases the full slots but forgets their SWA peers (and their mapping)."""

    def free(self, free_index: torch.Tensor) -> None:
        self.full_attn_allocator.free(free_index)


class FreshSwaPagesOnExtend(SWATokenToKVPoolAllocator):
    """alloc_extend gives the SWA side whole fresh pages instead of continuing the SWA page
    of last_loc, so a request extended mid-page spans two SWA pages within one full page."""

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
    ) -> torch.Tensor | None:
        full_pool = cast(PagedTokenToKVPoolAllocator, self.full_attn_allocator)
        full = full_pool.alloc_extend(
            prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens
        )
        if full is None:
            return None
        pages = -(-extend_num_tokens // self.page_size)
        swa = cast(PagedTokenToKVPoolAllocator, self.swa_attn_allocator).alloc(pages * self.page_size)
        if swa is None:
            return None
        self.full_to_swa_index_mapping[full] = swa[:extend_num_tokens]
        return full


class GroupEndWithoutBeginIsSilent(SWATokenToKVPoolAllocator):
    """free_group_end with no group open returns quietly instead of raising (sglang's behaviour)."""

    def free_group_end(self) -> None:
        if self.in_free_group:
            super().free_group_end()


FIXTURES: dict[str, type[SWATokenToKVPoolAllocator]] = {
    fixture.__name__: fixture
    for fixture in (
        PadPageInFullFreeList,
        DoubleAppendsFullFrees,
        StagedUnitsUncounted,
        KeepsMappingOnFreeSwa,
        LeaksSwaOnFreeSwa,
        FreeSkipsSwaPeers,
        FreshSwaPagesOnExtend,
        GroupEndWithoutBeginIsSilent,
    )
}
