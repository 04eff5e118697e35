"""Token allocator (page size 1): one unit is one KV slot."""

from __future__ import annotations

from typing import Any

import torch

from allocator.errors import DoubleFreeError
from allocator.free_list import FreeListAllocator, Reservation
from allocator.validation import check_count


def first_occurrences(values: torch.Tensor) -> torch.Tensor:
    """`values` without repeats, each kept where it first appears."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(values.numel(), device=values.device)
    first = torch.full((unique.numel(),), values.numel(), dtype=torch.int64, device=values.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return values[torch.sort(first).values]


class TokenToKVPoolAllocator(FreeListAllocator):
    """Slots 1..size. Freed slots are appended to the free list (or staged, with need_sort)."""

    unit_name = "slot"

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kvcache: Any = None,
        need_sort: bool = False,
        checked: bool = False,
    ) -> None:
        super().__init__(size, 1, dtype, device, kvcache, need_sort, checked)

    def alloc(self, need_size: int) -> torch.Tensor | None:
        """The first `need_size` free slots, or None (and no change) if there are not enough."""
        return self.allocate(self.reserve_tokens(need_size))

    def reserve_tokens(self, need_size: int) -> Reservation:
        need_size = check_count("need_size", need_size)
        return Reservation(need_size, need_size, lambda free_pages: free_pages[:need_size])

    def units_of(self, free_index: torch.Tensor) -> torch.Tensor:
        return free_index

    def check_units_allocated(self, units: torch.Tensor, free_index: torch.Tensor) -> None:
        if torch.unique(units).numel() != units.numel():
            raise DoubleFreeError(f"free names a slot twice: {free_index.tolist()[:16]}")
        super().check_units_allocated(units, free_index)

    def deduplicate(self, units: torch.Tensor) -> torch.Tensor:
        return first_occurrences(units)

    def return_units(self, units: torch.Tensor) -> None:
        if self.need_sort:
            self.release_pages = torch.cat((self.release_pages, units))
        else:
            self.free_pages = torch.cat((self.free_pages, units))
