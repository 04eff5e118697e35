"""The free-list machinery shared by the token and the paged allocator.

A pool hands out *units*: slots when page_size == 1, pages otherwise. Unit 0 is the padding
unit: it is never in a free list and never handed out.

Data structures (invariants stated where they live):
  free_pages     units ready to hand out, taken from the front.
  release_pages  with need_sort, freed units wait here until a merge sorts them into
                 free_pages; without need_sort it stays empty.
  free_group     while a free group is open, the units of every free call, in call order;
                 None when no group is open.
  allocated      checked mode only: allocated[u] is True while unit u is handed out and not
                 yet freed (a unit deferred in an open group counts as freed).
A unit is in at most one of free_pages, release_pages, free_group and the allocated set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from allocator.errors import DoubleFreeError, FreeGroupError, InvalidStateError
from allocator.validation import (
    canonical_device,
    check_dtype,
    check_pool_config,
    check_range,
    check_vector,
)


@dataclass(frozen=True)
class Reservation:
    """What one allocation needs: `units` fresh units, a merge when fewer than
    `merge_threshold` units are ready (the need_sort trigger), and `build`, which turns the
    free list (after any merge) into the returned token indices."""

    units: int
    merge_threshold: int
    build: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PoolState:
    """A saved copy of one pool, from `backup_state`."""

    free_pages: torch.Tensor
    release_pages: torch.Tensor
    allocated: torch.Tensor | None


class FreeListAllocator:
    """Common base of `TokenToKVPoolAllocator` and `PagedTokenToKVPoolAllocator`."""

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kvcache: Any = None,
        need_sort: bool = False,
        checked: bool = False,
    ) -> None:
        check_pool_config(size, page_size)
        self.size = size
        self.page_size = page_size
        self.num_pages = size // page_size
        self.dtype = check_dtype(dtype)
        self.device = canonical_device(device)
        self.kvcache = kvcache
        self.need_sort = need_sort
        self.checked = checked
        self.clear()

    # ----------------------------------------------------------------- state
    def clear(self) -> None:
        """Every unit free, in order 1..num_pages; no group open."""
        self.free_pages = torch.arange(1, self.num_pages + 1, dtype=torch.int64, device=self.device)
        self.release_pages = self._empty()
        self.free_group: list[torch.Tensor] | None = None
        self.allocated = (
            torch.zeros(self.num_pages + 1, dtype=torch.bool, device=self.device) if self.checked else None
        )

    def backup_state(self) -> PoolState:
        self._require_no_group("backup_state")
        allocated = None if self.allocated is None else self.allocated.clone()
        return PoolState(self.free_pages.clone(), self.release_pages.clone(), allocated)

    def restore_state(self, state: PoolState) -> None:
        self.check_state(state)
        self.free_pages = state.free_pages.clone()
        self.release_pages = state.release_pages.clone()
        if state.allocated is not None:  # check_state: present exactly when this pool is checked
            self.allocated = state.allocated.clone()

    def check_state(self, state: object) -> None:
        """Raise InvalidStateError unless `state` could have come from this pool's backup_state."""
        self._require_no_group("restore_state")
        if not isinstance(state, PoolState):
            raise InvalidStateError(f"expected a PoolState, got {type(state).__name__}")
        for name in ("free_pages", "release_pages"):
            tensor = getattr(state, name)
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or tensor.device != self.device:
                raise InvalidStateError(f"state.{name} is not an int64 tensor on {self.device}")
            # A padding or out-of-range unit in a free list would later be handed out.
            if tensor.dim() != 1 or (tensor.numel() and (int(tensor.min()) < 1 or int(tensor.max()) > self.num_pages)):
                raise InvalidStateError(f"state.{name} is not a list of {self.unit_name}s 1..{self.num_pages}")
        if (state.allocated is None) != (self.allocated is None):
            raise InvalidStateError("state was saved with a different checked mode")
        if state.allocated is not None and self.allocated is not None and state.allocated.shape != self.allocated.shape:
            raise InvalidStateError("state.allocated belongs to a pool of another size")

    # ----------------------------------------------------------- introspection
    def available_size(self) -> int:
        return (self.free_pages.numel() + self.release_pages.numel()) * self.page_size

    def get_all_free_pages(self) -> torch.Tensor:
        """Every free unit (ready, then staged): page ids, or slot ids at page size 1."""
        return torch.cat((self.free_pages, self.release_pages))

    @property
    def index_limit(self) -> int:
        """One past the largest token index this pool can hand out."""
        return (self.num_pages + 1) * self.page_size

    def merge_and_sort_free(self) -> None:
        self.free_pages = torch.sort(torch.cat((self.free_pages, self.release_pages))).values
        self.release_pages = self._empty()

    # ------------------------------------------------------------- allocation
    def can_serve(self, reservation: Reservation) -> bool:
        """Whether the allocation would succeed, counting staged units (no change made)."""
        return reservation.units <= self.free_pages.numel() + self.release_pages.numel()

    def reserve(self, reservation: Reservation) -> bool:
        """Apply the need_sort merge trigger; True if enough units are then ready."""
        if self.need_sort and reservation.merge_threshold > self.free_pages.numel():
            self.merge_and_sort_free()
        return reservation.units <= self.free_pages.numel()

    def commit(self, reservation: Reservation) -> torch.Tensor:
        """Hand out the reserved units; `reserve` must have returned True."""
        indices = reservation.build(self.free_pages)
        taken = self.free_pages[: reservation.units]
        self.free_pages = self.free_pages[reservation.units :]
        if self.allocated is not None:
            self.allocated[taken] = True
        return indices

    def allocate(self, reservation: Reservation) -> torch.Tensor | None:
        if not self.reserve(reservation):
            return None
        return self.commit(reservation)

    # ------------------------------------------------------------------ frees
    def free(self, free_index: torch.Tensor) -> None:
        """Release the units of `free_index` (deferred while a free group is open)."""
        self.release_units(self.units_to_free(free_index))

    def units_to_free(self, free_index: torch.Tensor) -> torch.Tensor:
        """Validate a free and return the units it releases, without changing anything."""
        check_vector("free_index", free_index, self.device)
        check_range("free_index", free_index, self.page_size, self.index_limit)
        units = self.units_of(free_index)
        if self.allocated is not None and units.numel():
            self.check_units_allocated(units, free_index)
        return units

    def check_units_allocated(self, units: torch.Tensor, free_index: torch.Tensor) -> None:
        """Checked mode: raise DoubleFreeError unless every unit is allocated."""
        if self.allocated is None:
            return
        not_allocated = units[~self.allocated[units]]
        if not_allocated.numel():
            raise DoubleFreeError(
                f"free of {self.unit_name}s that are not allocated (already free or freed twice): "
                f"{not_allocated.tolist()[:16]}"
            )

    def release_units(self, units: torch.Tensor) -> None:
        if units.numel() == 0:
            return
        if self.allocated is not None:
            self.allocated[units] = False
        if self.free_group is not None:
            self.free_group.append(units)
        else:
            self.return_units(units)

    def free_group_begin(self) -> None:
        if self.free_group is not None:
            raise FreeGroupError("free_group_begin inside an open free group")
        self.free_group = []

    def free_group_end(self) -> None:
        """Release everything deferred since free_group_begin as one free, each unit once."""
        if self.free_group is None:
            raise FreeGroupError("free_group_end without free_group_begin")
        pending, self.free_group = self.free_group, None
        if pending:
            self.return_units(self.deduplicate(torch.cat(pending)))

    def _require_no_group(self, what: str) -> None:
        if self.free_group is not None:
            raise FreeGroupError(f"{what} inside an open free group")

    def _empty(self) -> torch.Tensor:
        return torch.empty((0,), dtype=torch.int64, device=self.device)

    # ------------------------------------------------- what the subclasses say
    unit_name = "unit"

    def units_of(self, free_index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def deduplicate(self, units: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def return_units(self, units: torch.Tensor) -> None:
        raise NotImplementedError
