"""Mutants of the frees, of backup/restore, clear, translation and the sizes."""

from __future__ import annotations

import torch

from allocator.swa import SWAState
from canary.invariants import Name
from properties.targets.mutants.base import Mutant


# ------------------------------------------------------------------------ frees
class FreeSwaTokenGranular(Mutant):
    """Bug class: at page size > 1, free_swa releases whole SWA pages but zeroes the mapping
    only of the tokens it was given, so the page's other tokens keep peers on a freed page.

    Report: sglang #27779 ("Fix paged SWA free mapping cleanup"), the root of #27789 (SWA pool
    leak with spec decoding and page_size > 1).
    Breaks LEAK (tokens behind the evict floor keep their peers), SWA_LE_FULL (those
    peers are on a free SWA page) or, when the request ends with that free_swa, STALE (its
    freed full slots keep their peers).
    Checked mode off: after a free_swa that names part of a page, the checked free_full of
    that page rejects the peers left behind, which would stop the bug before the mapping
    shows it.
    """

    breaks = (Name.LEAK, Name.SWA_LE_FULL, Name.STALE)
    checked_mode = False

    def _release_swa_peers(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        peers = self.full_to_swa_index_mapping[free_index]
        swa_units = self.swa_attn_allocator.units_to_free(peers[peers > 0])
        self.full_to_swa_index_mapping[free_index] = 0
        self.swa_attn_allocator.release_units(swa_units)


class FreeSwaReleasesPad(Mutant):
    """Bug class: the SWA release skips the `peer > 0` filter, so every unmapped entry (0)
    releases the padding slot / page 0 into the SWA free list.

    Report: sglang #38519 ("skip unmapped reps in the segment free path (page-0 double
    free)"); #36637 on the filter being all that kept the padding slot out of the free list.
    Checked mode off: the checked pool would reject the padding unit as out of range before
    it could reach the free list, and sglang's segment path has no such check.
    Breaks PAD.
    """

    breaks = (Name.PAD,)
    checked_mode = False

    def _release_swa_peers(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        ps = self.page_size
        tokens = free_index if ps == 1 else self._tokens_of_units(torch.unique(free_index // ps))
        swa = self.swa_attn_allocator
        units = swa.units_of(self.full_to_swa_index_mapping[tokens])
        self.full_to_swa_index_mapping[tokens] = 0
        swa.release_units(units)


class FreeKeepsMapping(Mutant):
    """Bug class: free() returns the SWA peers and the full slots to their pools but leaves
    the freed slots' mapping entries in place (stale pairs pointing at recycled SWA slots).

    Report: sglang #27586 (a stale entry pointed at an SWA slot already reused, so free_swa
    freed a live slot) and #25385 ("Fix stale full <-> SWA token mappings").
    Breaks STALE (free full slots keep their mapping), with SWA_LE_FULL (entries on free SWA
    slots).
    """

    breaks = (Name.STALE, Name.SWA_LE_FULL)

    def free(self, free_index: torch.Tensor) -> None:
        full = self.full_attn_allocator
        full_units = full.units_to_free(free_index)
        tokens = free_index if self.page_size == 1 else self._tokens_of_units(full_units)
        peers = self.full_to_swa_index_mapping[tokens]
        self.swa_attn_allocator.release_units(self.swa_attn_allocator.units_to_free(peers[peers > 0]))
        full.release_units(full_units)


# ------------------------------------------------------------- state and sizes
class RestoreSkipsMapping(Mutant):
    """Bug class: restore_state() restores both pools but not the full-to-SWA mapping.

    Report: sglang #23237 (review: the mapping part of a restore_state was restored by a
    fragile rule and could be left wrong); #32709 removed the never-tested backup/restore pair.
    Breaks SWA_LE_FULL (entries pointing at SWA slots that are free again), and STALE when
    the restored full pool has freed their slots.
    """

    breaks = (Name.SWA_LE_FULL, Name.STALE)

    def restore_state(self, state: SWAState) -> None:
        self.full_attn_allocator.restore_state(state.full)
        self.swa_attn_allocator.restore_state(state.swa)


class ClearDropsSentinel(Mutant):
    """Bug class: clear() zeroes the whole mapping, sentinel included, so translating
    last_loc = -1 afterwards gives 0 (the padding slot) instead of -1.

    Source: SPEC §1.3 (the sentinel -1 "nothing may ever overwrite"); the mapping length
    size + page_size + 1 that holds it comes from sgl-project/sglang-jax commit 2824472 ("Fix
    mapping OOB: mapping_size = size + page_size").
    Breaks SENTINEL.
    """

    breaks = (Name.SENTINEL,)

    def clear(self) -> None:
        self.full_attn_allocator.clear()
        self.swa_attn_allocator.clear()
        self.full_to_swa_index_mapping.zero_()


class TranslateOffByOne(Mutant):
    """Bug class: translation reads a view of the mapping without its sentinel, so index -1
    (a request with no tokens) translates to the last real entry (0) instead of -1.

    Source: SPEC §1.3 (translate_loc_from_full_to_swa(idx) = mapping[idx], -1 -> -1 through
    the sentinel); the sentinel slot is the one sglang-jax 2824472 added past size + page_size.
    Breaks XLAT.
    """

    breaks = (Name.XLAT,)

    def translate_loc_from_full_to_swa(self, kv_indices: torch.Tensor) -> torch.Tensor:
        return self.full_to_swa_index_mapping[:-1][kv_indices]


class AvailableUsesMax(Mutant):
    """Bug class: available_size() reports the larger pool's free space, not the smaller's,
    so the scheduler admits work the SWA pool cannot hold.

    Report: sglang #10122 (a hybrid available_size that combined the two pools' sizes
    instead of taking the minimum), #15867 (the hybrid available_size path was missing).
    Breaks AVAIL.
    """

    breaks = (Name.AVAIL,)

    def available_size(self) -> int:
        return max(self.full_available_size(), self.swa_available_size())
