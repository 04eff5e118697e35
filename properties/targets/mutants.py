"""Mutants of the reference allocator: each is `SWATokenToKVPoolAllocator` with ONE realistic
bug, used to check that the state machines and the invariant registry catch real faults.

Every mutant is a small subclass overriding one method (a free-group or pool bug may need
the two or three methods that share the faulty bookkeeping). Its docstring names the bug
class and the public report it comes from (numbers are sgl-project/sglang pull requests
and issues unless said otherwise); a class that comes from the SPEC rather than a report
says so. `breaks` lists the invariants the bug breaks at the step where it shows: which of
them a check reports first depends on the program that reaches it.

Bugs that live inside a pool (merge, free-list order, the paged index arithmetic) are pool
subclasses; `PoolMutant` gives both pools of the hybrid allocator the mutated class, as
sharing one pool implementation does in a real engine.

Checked mode (`checked_mode`) is on, as in the reference target, unless it would turn the
bug into a typed error before any invariant can see it: such a mutant sets it off and says
why.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from allocator import (
    PagedTokenToKVPoolAllocator,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from allocator.free_list import FreeListAllocator, Reservation
from allocator.paged import decode_indices, extend_indices
from allocator.swa import SWAState
from canary.invariants import Name
from properties.targets import AllocatorConfig, build_allocator


class Mutant(SWATokenToKVPoolAllocator):
    """Base of every mutant: the invariants its bug breaks, and its checked mode."""

    breaks: tuple[Name, ...] = ()
    checked_mode: bool = True


class PoolMutant(Mutant):
    """A mutant whose bug lives in a pool class: both pools of that page size take it."""

    token_pool: type[TokenToKVPoolAllocator] | None = None
    paged_pool: type[PagedTokenToKVPoolAllocator] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        mutated = self.paged_pool if self.page_size > 1 else self.token_pool
        if mutated is not None:
            for pool in (self.full_attn_allocator, self.swa_attn_allocator):
                pool.__class__ = mutated


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
    take), and WINDOW when the new token lands on a page without an SWA peer.
    """

    breaks = (Name.NODUP, Name.CONSERVE, Name.WINDOW)
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


MUTANTS: dict[str, type[Mutant]] = {
    "tail_maps_non_tail_slots": TailMapsNonTailSlots,
    "tail_maps_padded_end": TailMapsPaddedEnd,
    "tail_start_rounded_up": TailStartRoundedUp,
    "group_resolves_at_end": GroupResolvesAtEnd,
    "group_end_flushes_twice": GroupEndFlushesTwice,
    "nested_begin_drops_pending": NestedBeginDropsPending,
    "clear_leaves_group_open": ClearLeavesGroupOpen,
    "extend_ignores_last_page_contiguity": ExtendIgnoresLastPageContiguity,
    "decode_wrong_page_at_boundary": DecodeWrongPageAtBoundary,
    "merge_forgets_staged": MergeForgetsStaged,
    "non_atomic_pair": NonAtomicPair,
    "swa_last_loc_untranslated": SwaLastLocUntranslated,
    "token_free_goes_to_front": TokenFreeGoesToFront,
    "free_swa_token_granular": FreeSwaTokenGranular,
    "free_swa_releases_pad": FreeSwaReleasesPad,
    "free_keeps_mapping": FreeKeepsMapping,
    "restore_skips_mapping": RestoreSkipsMapping,
    "clear_drops_sentinel": ClearDropsSentinel,
    "translate_off_by_one": TranslateOffByOne,
    "available_uses_max": AvailableUsesMax,
}


def mutant_factory(name: str) -> Callable[[AllocatorConfig], Mutant]:
    """A factory for `run_check(target=...)` that builds the named mutant."""
    if name not in MUTANTS:
        raise KeyError(f"no mutant {name!r}; known: {', '.join(sorted(MUTANTS))}")
    mutant = MUTANTS[name]

    def factory(config: AllocatorConfig) -> Mutant:
        return build_allocator(mutant, config, checked=mutant.checked_mode)

    factory.__name__ = f"mutant:{name}"
    return factory
