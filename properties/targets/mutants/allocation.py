"""Mutants of allocation: paged extension and decode, the need_sort merge, the two-pool pair,
the SWA last_loc, the token free list."""

from __future__ import annotations

import torch

from allocator import (
    PagedTokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from allocator.free_list import FreeListAllocator, Reservation
from allocator.paged import decode_indices, extend_indices
from canary.invariants import Name
from properties.targets.mutants.base import Mutant, PoolMutant


# ------------------------------------------------------------------ allocation
class _ResumesAtLastLoc(PagedTokenToKVPoolAllocator):
    def reserve_extend(self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens):
        reservation = super().reserve_extend(
            prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens
        )
        pages, ps = reservation.units, self.page_size

        def build(free_pages: torch.Tensor) -> torch.Tensor:
            return extend_indices(prefix_lens, seq_lens, last_loc - 1, free_pages[:pages], extend_num_tokens, ps)

        return Reservation(reservation.units, reservation.merge_threshold, build)


class ExtendIgnoresLastPageContiguity(PoolMutant):
    """Bug class: the paged extension does not honour the contiguity of the request's last,
    partly filled page: it resumes AT last_loc instead of at last_loc + 1, so the first new
    token is the request's own last token and the page's last slot is never handed out.

    Report: sglang #39040 (the paged allocation's last_loc read one row too early, so
    last_loc + 1 resolved to a slot already held and aliased a page); the alloc_extend kernel
    fixes #19780 / #19898 touched the same index arithmetic.
    Breaks NODUP (an allocation returns a slot in use).
    """

    breaks = (Name.NODUP,)
    paged_pool = _ResumesAtLastLoc


class _DecodesOnLengthAfterStep(PagedTokenToKVPoolAllocator):
    def reserve_decode(self, seq_lens, seq_lens_cpu, last_loc):
        reservation = super().reserve_decode(seq_lens, seq_lens_cpu, last_loc)
        ps = self.page_size
        pages = int((seq_lens_cpu % ps == 0).sum())

        def build(free_pages: torch.Tensor) -> torch.Tensor:
            return decode_indices(seq_lens + 1, last_loc, free_pages[:pages], ps)

        return Reservation(pages, reservation.merge_threshold, build)


class DecodeWrongPageAtBoundary(PoolMutant):
    """Bug class: alloc_decode decides "new page" from seq_len % ps (the length after the
    step) instead of (seq_len - 1) % ps (the new token's position): at a page boundary it
    continues past the end of the last page into a page it does not own, and it opens a new
    page one token early.

    Report: sglang #39040 (the new-page decision used the wrong length), #31616 (EAGLE decode
    lengths not page-aligned).
    Breaks NODUP (a slot of a page it does not own) or CONSERVE (a page the model did not
    take), WINDOW when the new token lands on a page without an SWA peer, and CAPACITY when
    the early page is one the pools no longer have (a decode that needs no page is refused).
    """

    breaks = (Name.NODUP, Name.CONSERVE, Name.WINDOW, Name.CAPACITY)
    paged_pool = _DecodesOnLengthAfterStep


class _MergeKeepsStaged(FreeListAllocator):
    def merge_and_sort_free(self) -> None:
        self.free_pages = torch.sort(torch.cat((self.free_pages, self.release_pages))).values


class MergeForgetsStaged(PoolMutant):
    """Bug class: the need_sort merge sorts the staged units into the ready list but forgets
    the staging list itself, so every staged unit is free twice and can be handed out twice.

    Report: sglang #37146 (deferred release chunks, materialised into the free list when an
    allocation runs short, that must then leave the pending list), on the release_pages
    staging of sglang #8133.
    Breaks NODUP (units in both lists) and CONSERVE (available_size counts them twice).
    """

    breaks = (Name.NODUP, Name.CONSERVE)
    token_pool = type("TokenPoolMergeKeepsStaged", (_MergeKeepsStaged, TokenToKVPoolAllocator), {})
    paged_pool = type("PagedPoolMergeKeepsStaged", (_MergeKeepsStaged, PagedTokenToKVPoolAllocator), {})


class NonAtomicPair(Mutant):
    """Bug class: the two-pool allocation serves the full pool before asking the SWA pool,
    so when the SWA pool is short it returns None with the full slots already taken.

    Report: sglang #35338 ("full-attention pages were allocated before SWA pages; if the SWA
    allocation failed, the full allocator had already consumed pages"); the check-after-use
    order of #22035 / #30892 / #34399 in the paged kernels.
    Breaks ATOMIC.
    """

    breaks = (Name.ATOMIC,)

    def _allocate_pair(self, full_reservation, swa_reservation, swa_tail=None):
        full, swa = self.full_attn_allocator, self.swa_attn_allocator
        if swa_reservation is not None and not swa.can_serve(swa_reservation) and full.can_serve(full_reservation):
            full.allocate(full_reservation)
            return None
        return super()._allocate_pair(full_reservation, swa_reservation, swa_tail)


class _CapacityWithoutStaged(FreeListAllocator):
    def can_serve(self, reservation: Reservation) -> bool:
        return reservation.units <= self.free_pages.numel()


class PrecheckIgnoresStaged(PoolMutant):
    """Bug class: the two-pool pre-check counts only a pool's ready units, not the units
    need_sort staged (which the merge would make ready), so an allocation the pools can serve
    returns None.

    Source: SPEC §1.1-1.3 (available_size() counts staged units; an allocation is refused only
    when a pool is short after the merge).
    Breaks CAPACITY.
    """

    breaks = (Name.CAPACITY,)
    token_pool = type("TokenPoolCapacityWithoutStaged", (_CapacityWithoutStaged, TokenToKVPoolAllocator), {})
    paged_pool = type("PagedPoolCapacityWithoutStaged", (_CapacityWithoutStaged, PagedTokenToKVPoolAllocator), {})


class SwaLastLocUntranslated(Mutant):
    """Bug class: the SWA side of an extension or decode continues from the FULL last_loc,
    assuming full and SWA indices are identical, instead of translating it through the
    mapping.

    Source: SPEC §1.3 ("the SWA side's last_loc is the full last_loc translated through the
    mapping") and §3 (sglang's swa_full_idx_divergence counter exists because the two index
    spaces diverge).
    Checked mode off: the checked SWA pool rejects a last_loc on a page it has not allocated,
    which would stop the bug before the mapping shows it.
    Breaks PAGE (the SWA side continues on another page or offset), SWA_LE_FULL (peers on
    free or foreign SWA slots) or CONSERVE.
    """

    breaks = (Name.PAGE, Name.SWA_LE_FULL, Name.CONSERVE)
    checked_mode = False

    def _swa_last_loc(self, prefix_lens: torch.Tensor, last_loc: torch.Tensor) -> torch.Tensor:
        return last_loc


class _FreesToFront(TokenToKVPoolAllocator):
    def return_units(self, units: torch.Tensor) -> None:
        if self.need_sort:
            super().return_units(units)
        else:
            self.free_pages = torch.cat((units, self.free_pages))


class TokenFreeGoesToFront(PoolMutant):
    """Bug class: the token allocator puts freed slots at the FRONT of its free list (the
    paged allocator's convention) instead of appending them, so slots are reused in another
    order than sglang's.

    Source: SPEC §1.1 / §1.2 (the free-list order is part of the contract); a refactor that
    shares one free routine between the token and the paged pool makes exactly this change.
    Breaks CONTRACT (only the order of handed-out slots differs).
    """

    breaks = (Name.CONTRACT,)
    token_pool = _FreesToFront
