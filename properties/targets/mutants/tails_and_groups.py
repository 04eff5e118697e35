"""Mutants of the SWA tail allocation and of free groups."""

from __future__ import annotations

import torch

from allocator import (
    PagedTokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from allocator.free_list import FreeListAllocator
from canary.invariants import Name
from properties.targets.mutants.base import Mutant, PoolMutant


# --------------------------------------------------------------- tail allocation
class TailMapsNonTailSlots(Mutant):
    """Bug class: a tail-only SWA allocation leaves SWA peers on its non-tail full slots.

    Report: sglang #25805 (cherry-picked as #26078; review of #26078 notes the
    swa_tail_len == 0 path too), also #25834 and #25385 — non-tail slots kept the stale 1:1
    peers of a recycled page, and a later free double-freed SWA pages of other requests.
    Here free slots always map to 0, so the pure "forgot to zero" omission is an equivalent
    mutant; this one gives the non-tail slots the same fault observably: it maps the whole
    page-padded SWA reservation (from the tail's page start) instead of only the tail.
    Breaks CONTRACT (non-tail slots hold peers the model does not have).
    """

    breaks = (Name.CONTRACT,)

    def _allocate_pair(self, full_reservation, swa_reservation, swa_tail=None):
        if swa_tail is None or swa_reservation is None:
            return super()._allocate_pair(full_reservation, swa_reservation, swa_tail)
        full, swa = self.full_attn_allocator, self.swa_attn_allocator
        if not (full.can_serve(full_reservation) and swa.can_serve(swa_reservation)):
            return None
        full.reserve(full_reservation)
        full_indices = full.commit(full_reservation)
        swa.reserve(swa_reservation)
        swa_indices = swa.commit(swa_reservation)
        mapped = min(full_indices.numel(), swa_indices.numel())
        self.full_to_swa_index_mapping[full_indices[full_indices.numel() - mapped :]] = swa_indices[
            swa_indices.numel() - mapped :
        ]
        return full_indices


class TailMapsPaddedEnd(Mutant):
    """Bug class: the tail is bound to the end of its page-padded SWA span (the last slots of
    the last SWA page) instead of to the slots of the real window, which end at seq_len.

    Report: the binding-from-the-wrong-end class of taco-project/FlexKV #287 ("bind SWA GPU
    pages from the tail of the slot mapping"); sglang #24036 / #24857 introduced the
    page-padded SWA tail that this arithmetic works on. Whenever seq_len is not a multiple of
    the page size the tail lands at the wrong offsets.
    Breaks PAGE.
    """

    breaks = (Name.PAGE,)

    def _allocate_pair(self, full_reservation, swa_reservation, swa_tail=None):
        full_indices = super()._allocate_pair(full_reservation, swa_reservation, swa_tail)
        if full_indices is None or not swa_tail:
            return full_indices
        ps = self.page_size
        tail_tokens = full_indices[full_indices.numel() - swa_tail :]
        swa_pages = torch.unique_consecutive(self.full_to_swa_index_mapping[tail_tokens] // ps)
        padded = (swa_pages[:, None] * ps + torch.arange(ps, device=self.device)).reshape(-1)
        self.full_to_swa_index_mapping[tail_tokens] = padded[padded.numel() - swa_tail :]
        return full_indices


class TailStartRoundedUp(Mutant):
    """Bug class: the SWA window start is rounded UP to a page boundary, so the tokens
    between the real window start and the next page boundary get no SWA slot.

    Report: sglang #29860 and #34870 (the page-aligned SWA eviction frontier advanced onto the
    live window and left a leaf without its full window), #24036 (the tail length derived from
    the page-floored window start).
    Breaks WINDOW when the dropped tokens are inside the window, and always shows as SWA
    units the model allocated and the mutant did not (NODUP or CONSERVE).
    """

    breaks = (Name.WINDOW, Name.NODUP, Name.CONSERVE)

    def alloc_extend_swa_tail(
        self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens, swa_tail_len
    ):
        if seq_lens_cpu.numel() == 1 and isinstance(swa_tail_len, int) and swa_tail_len > 0:
            seq, ps = int(seq_lens_cpu[0]), self.page_size
            rounded_start = -(-(seq - swa_tail_len) // ps) * ps
            swa_tail_len = max(0, seq - rounded_start)
        return super().alloc_extend_swa_tail(
            prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens, swa_tail_len
        )


# ------------------------------------------------------------------- free groups
class GroupResolvesAtEnd(Mutant):
    """Bug class: inside a free group, free_swa / free defer the full indices and resolve
    their SWA peers (and zero the mapping) only at free_group_end, instead of at the call.

    Report: sglang #36135 (fixes #36081: a one-page SWA leak after grouped frees, because the
    mapping was re-read at flush) and #36646 ("resolve SWA ownership at enqueue time").
    Checked mode off: the checked free_full refuses slots whose peers are still mapped, which
    they are here until the group ends, and sglang's free_full has no such check.
    Breaks SWA_LE_FULL and LEAK (window-evicted tokens keep peers on units the group already
    released), or STALE (freed full slots keep their mapping).
    """

    breaks = (Name.SWA_LE_FULL, Name.LEAK, Name.STALE)
    checked_mode = False

    def free_group_begin(self) -> None:
        super().free_group_begin()
        self.unresolved: list[torch.Tensor] = []

    def _release_swa_peers(self, free_index: torch.Tensor) -> None:
        if self.in_free_group:
            self.unresolved.append(free_index.clone())
            return
        super()._release_swa_peers(free_index)

    def free_group_end(self) -> None:
        if self.in_free_group:
            for free_index in self.unresolved:
                super()._release_swa_peers(free_index)
        super().free_group_end()


class _FlagAndListDrift(FreeListAllocator):
    """free_group_end clears the "in a group" flag but never empties the deferred list, and
    checks the flag only through the list: an end with no group open flushes the last group
    again."""

    def free_group_end(self) -> None:
        if self.free_group is not None:
            self.last_group = self.free_group
        pending, self.free_group = getattr(self, "last_group", []), None
        if pending:
            self.return_units(self.deduplicate(torch.cat(pending)))


class GroupEndFlushesTwice(PoolMutant):
    """Bug class: the free-group flag and the deferred list drift apart, so a second
    free_group_end() (with no group open, which must raise) releases the same units again.

    Report: sglang #36739 ("calling free_group_end() twice released the same indices again").
    Breaks CONTRACT (the stray end does not raise) and, after a group with frees, NODUP
    (the units come back twice).
    """

    breaks = (Name.CONTRACT, Name.NODUP)
    token_pool = type("TokenPoolFlushesTwice", (_FlagAndListDrift, TokenToKVPoolAllocator), {})
    paged_pool = type("PagedPoolFlushesTwice", (_FlagAndListDrift, PagedTokenToKVPoolAllocator), {})


class NestedBeginDropsPending(Mutant):
    """Bug class: a nested free_group_begin() restarts the group instead of raising, silently
    dropping the frees deferred so far.

    Report: sglang #36646 ("reject nested free_group_begin(): a nested begin silently ...").
    Breaks CONTRACT (the nested begin does not raise); the dropped units are never freed
    (CONSERVE) once the group ends.
    """

    breaks = (Name.CONTRACT,)

    def free_group_begin(self) -> None:
        for pool in (self.full_attn_allocator, self.swa_attn_allocator):
            pool.free_group = []


class ClearLeavesGroupOpen(Mutant):
    """Bug class: clear() resets the pools and the mapping but leaves an open free group open,
    so every later free is deferred to an end that never comes.

    Source: SPEC §1.3 (clear: "no free group open"); the flag/list drift of sglang #36739 is
    the same kind of state left behind.
    Breaks CONTRACT (the allocator reports a free group the model does not have).
    """

    breaks = (Name.CONTRACT,)

    def clear(self) -> None:
        was_open = self.in_free_group
        super().clear()
        if was_open:
            for pool in (self.full_attn_allocator, self.swa_attn_allocator):
                pool.free_group = []
