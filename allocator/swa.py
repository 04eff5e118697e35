"""The hybrid SWA allocator: a full-attention pool, a sliding-window pool and the mapping
that pairs each full slot with its SWA slot.

Data structures:
  full_attn_allocator   pool of `size` full-attention slots.
  swa_attn_allocator    pool of `size_swa` sliding-window slots.
  full_to_swa_index_mapping
      int64, length size + page_size + 1. Entry t is the SWA slot paired with full slot t,
      0 meaning "none". The last entry is the sentinel -1, so that translating last_loc = -1
      (a request with no tokens yet) gives -1; nothing writes it except `clear`.
Invariants kept by every call: a nonzero entry points at an allocated SWA slot that no other
entry points at, and only allocated full slots have nonzero entries. With pages, a full
page's tokens map to one SWA page at the same offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from allocator.errors import (
    InvalidIndexError,
    InvalidStateError,
    SWAPeerHeldError,
    UnsupportedOperationError,
)
from allocator.free_list import FreeListAllocator, PoolState, Reservation
from allocator.paged import PagedTokenToKVPoolAllocator
from allocator.token import TokenToKVPoolAllocator
from allocator.validation import (
    canonical_device,
    check_count,
    check_dtype,
    check_pool_config,
    check_range,
    check_vector,
)


@dataclass(frozen=True)
class SWAState:
    """A saved copy of both pools and the mapping, from `backup_state`."""

    full: PoolState
    swa: PoolState
    mapping: torch.Tensor


def make_pool(
    size: int, page_size: int, dtype: torch.dtype, device: torch.device, need_sort: bool, checked: bool
) -> FreeListAllocator:
    if page_size == 1:
        return TokenToKVPoolAllocator(size, dtype, device, need_sort=need_sort, checked=checked)
    return PagedTokenToKVPoolAllocator(size, page_size, dtype, device, need_sort=need_sort, checked=checked)


class SWATokenToKVPoolAllocator:
    """Reference SWA hybrid allocator (SPEC §1.3). `checked=True` also rejects frees of slots
    that are not allocated and `free_full` of slots whose SWA peer is still held."""

    def __init__(
        self,
        size: int,
        size_swa: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kvcache: Any = None,
        need_sort: bool = False,
        checked: bool = False,
    ) -> None:
        check_pool_config(size, page_size, "size")
        check_pool_config(size_swa, page_size, "size_swa")
        self.size = self.size_full = size
        self.size_swa = size_swa
        self.page_size = page_size
        self.dtype = check_dtype(dtype)
        self.device = canonical_device(device)
        self.need_sort = need_sort
        self.checked = checked
        self.full_attn_allocator = make_pool(size, page_size, dtype, self.device, need_sort, checked)
        self.swa_attn_allocator = make_pool(size_swa, page_size, dtype, self.device, need_sort, checked)
        self.full_to_swa_index_mapping = torch.zeros(size + page_size + 1, dtype=torch.int64, device=self.device)
        self.full_to_swa_index_mapping[-1] = -1
        self._kvcache = kvcache
        if kvcache is not None:
            kvcache.full_to_swa_index_mapping = self.full_to_swa_index_mapping

    # ----------------------------------------------------------------- sizes
    def available_size(self) -> int:
        return min(self.full_available_size(), self.swa_available_size())

    def full_available_size(self) -> int:
        return self.full_attn_allocator.available_size()

    def swa_available_size(self) -> int:
        return self.swa_attn_allocator.available_size()

    def get_kvcache(self) -> Any:
        return self._kvcache

    def translate_loc_from_full_to_swa(self, kv_indices: torch.Tensor) -> torch.Tensor:
        """The SWA slot of each full slot (0: none); -1 translates to -1 through the sentinel."""
        check_vector("kv_indices", kv_indices, self.device)
        check_range("kv_indices", kv_indices, -1, self.full_to_swa_index_mapping.numel() - 1)
        return self.full_to_swa_index_mapping[kv_indices]

    @property
    def in_free_group(self) -> bool:
        return self.full_attn_allocator.free_group is not None

    # ------------------------------------------------------------ allocation
    def alloc(self, need_size: int) -> torch.Tensor | None:
        """`need_size` slots on both pools (page size 1 only), or None with nothing changed."""
        full, swa = self._token_pools("alloc")
        need_size = check_count("need_size", need_size)
        return self._allocate_pair(full.reserve_tokens(need_size), swa.reserve_tokens(need_size))

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
    ) -> torch.Tensor | None:
        """Extend every request on both pools; the SWA side continues from last_loc's SWA peer."""
        full, swa = self._paged_pools("alloc_extend")
        full_reservation = full.reserve_extend(
            prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens
        )
        swa_last_loc = self._swa_last_loc(prefix_lens, last_loc)
        swa_reservation = swa.reserve_extend(
            prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, swa_last_loc, extend_num_tokens
        )
        return self._allocate_pair(full_reservation, swa_reservation)

    def alloc_decode(
        self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, last_loc: torch.Tensor
    ) -> torch.Tensor | None:
        """One slot per request on both pools for position seq_i - 1."""
        full, swa = self._paged_pools("alloc_decode")
        full_reservation = full.reserve_decode(seq_lens, seq_lens_cpu, last_loc)
        swa_last_loc = self._swa_last_loc(seq_lens - 1, last_loc)
        swa_reservation = swa.reserve_decode(seq_lens, seq_lens_cpu, swa_last_loc)
        return self._allocate_pair(full_reservation, swa_reservation)

    def alloc_extend_swa_tail(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
        swa_tail_len: int,
    ) -> torch.Tensor | None:
        """Extend one request with full slots for every new token but SWA slots only for its
        last `swa_tail_len` tokens; every other new full slot maps to 0.

        The tail keeps the page pairing: it continues last_loc's SWA page when it starts on the
        request's current page and that page still has an SWA peer; otherwise it gets fresh
        SWA pages, with the tail at the same offsets as on its full pages.
        """
        full, swa = self._paged_pools("alloc_extend_swa_tail")
        full_reservation = full.reserve_extend(
            prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens
        )
        if seq_lens.numel() != 1:
            raise InvalidIndexError(f"alloc_extend_swa_tail takes one request, got {seq_lens.numel()}")
        tail = check_count("swa_tail_len", swa_tail_len)
        prefix, seq = int(prefix_lens_cpu[0]), int(seq_lens_cpu[0])
        if tail > seq - prefix:
            raise InvalidIndexError(f"swa_tail_len={tail} exceeds the {seq - prefix} tokens being extended")
        swa_reservation = self._reserve_swa_tail(swa, prefix, seq, tail, seq_lens, seq_lens_cpu, last_loc)
        return self._allocate_pair(full_reservation, swa_reservation, tail)

    def _reserve_swa_tail(
        self,
        swa: PagedTokenToKVPoolAllocator,
        prefix: int,
        seq: int,
        tail: int,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
    ) -> Reservation | None:
        if tail == 0:
            return None
        ps = self.page_size
        tail_start = seq - tail
        swa_prefix, swa_last = tail_start // ps * ps, -1
        if prefix % ps and tail_start // ps == prefix // ps:
            peer = int(self.full_to_swa_index_mapping[last_loc[0]])
            if peer > 0:
                swa_prefix, swa_last = tail_start, peer + tail_start - prefix

        def as_tensor(value: int, device: torch.device) -> torch.Tensor:
            return torch.tensor([value], dtype=torch.int64, device=device)

        return swa.reserve_extend(
            as_tensor(swa_prefix, self.device),
            as_tensor(swa_prefix, torch.device("cpu")),
            seq_lens,
            seq_lens_cpu,
            as_tensor(swa_last, self.device),
            seq - swa_prefix,
        )

    def _swa_last_loc(self, prefix_lens: torch.Tensor, last_loc: torch.Tensor) -> torch.Tensor:
        """last_loc translated to the SWA pool; a partly filled page must still have its SWA peer."""
        swa_last_loc = self.full_to_swa_index_mapping[last_loc]
        mid_page = prefix_lens % self.page_size != 0
        if bool((mid_page & (swa_last_loc <= 0)).any()):
            raise InvalidIndexError(
                "last_loc's SWA peer has been released, so its page cannot be continued in the SWA pool"
            )
        return swa_last_loc

    def _allocate_pair(
        self, full_reservation: Reservation, swa_reservation: Reservation | None, swa_tail: int | None = None
    ) -> torch.Tensor | None:
        """Serve both pools or neither: check both before touching either."""
        full, swa = self.full_attn_allocator, self.swa_attn_allocator
        if not full.can_serve(full_reservation):
            return None
        if swa_reservation is not None and not swa.can_serve(swa_reservation):
            return None
        full.reserve(full_reservation)
        full_indices = full.commit(full_reservation)
        if swa_reservation is None:
            self.full_to_swa_index_mapping[full_indices] = 0
            return full_indices
        swa.reserve(swa_reservation)
        swa_indices = swa.commit(swa_reservation)
        if swa_tail is None:
            self.full_to_swa_index_mapping[full_indices] = swa_indices
        else:
            split = full_indices.numel() - swa_tail
            self.full_to_swa_index_mapping[full_indices[:split]] = 0
            self.full_to_swa_index_mapping[full_indices[split:]] = swa_indices[swa_indices.numel() - swa_tail :]
        return full_indices

    # ----------------------------------------------------------------- frees
    def free(self, free_index: torch.Tensor) -> None:
        """Release the SWA peers of `free_index`, then the full slots themselves."""
        full_units = self.full_attn_allocator.units_to_free(free_index)
        self._release_swa_peers(free_index)
        self.full_attn_allocator.release_units(full_units)

    def free_swa(self, free_index: torch.Tensor) -> None:
        """Release the SWA peers of `free_index` (whole pages at page size > 1) and zero their
        mapping. Entries that are already 0 are skipped."""
        full = self.full_attn_allocator
        check_vector("free_index", free_index, self.device)
        check_range("free_index", free_index, self.page_size, full.index_limit)
        if full.allocated is not None and free_index.numel():
            full.check_units_allocated(full.units_of(free_index), free_index)
        self._release_swa_peers(free_index)

    def free_full(self, free_index: torch.Tensor) -> None:
        """Release full slots whose SWA peers were already released."""
        full = self.full_attn_allocator
        units = full.units_to_free(free_index)
        if self.checked:
            held = self.full_to_swa_index_mapping[self._tokens_of_units(units)]
            if bool((held > 0).any()):
                raise SWAPeerHeldError(
                    f"free_full of slots whose SWA peers are still held: {free_index.tolist()[:16]}; use free()"
                )
        full.release_units(units)

    def _release_swa_peers(self, free_index: torch.Tensor) -> None:
        """Resolve and release the SWA peers now, even inside a free group (validated first)."""
        if free_index.numel() == 0:
            return
        if self.page_size == 1:
            tokens = free_index
        else:
            tokens = self._tokens_of_units(free_index.div(self.page_size, rounding_mode="floor").unique())
        peers = self.full_to_swa_index_mapping[tokens]
        swa_units = self.swa_attn_allocator.units_to_free(peers[peers > 0])
        self.full_to_swa_index_mapping[tokens] = 0
        self.swa_attn_allocator.release_units(swa_units)

    def _tokens_of_units(self, units: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.page_size, device=self.device)
        return (units[:, None] * self.page_size + offsets).reshape(-1)

    # ----------------------------------------------------------- free groups
    def free_group_begin(self) -> None:
        """Defer the releases of every free call until free_group_end (SWA peers are still
        resolved, and their mapping zeroed, at each call)."""
        self.full_attn_allocator.free_group_begin()
        self.swa_attn_allocator.free_group_begin()

    def free_group_end(self) -> None:
        self.full_attn_allocator.free_group_end()
        self.swa_attn_allocator.free_group_end()

    # ----------------------------------------------------------------- state
    def backup_state(self) -> SWAState:
        return SWAState(
            self.full_attn_allocator.backup_state(),
            self.swa_attn_allocator.backup_state(),
            self.full_to_swa_index_mapping.clone(),
        )

    def restore_state(self, state: SWAState) -> None:
        if not isinstance(state, SWAState):
            raise InvalidStateError(f"expected an SWAState, got {type(state).__name__}")
        self.full_attn_allocator.check_state(state.full)
        self.swa_attn_allocator.check_state(state.swa)
        mapping = state.mapping
        if not isinstance(mapping, torch.Tensor) or mapping.shape != self.full_to_swa_index_mapping.shape:
            raise InvalidStateError("state.mapping belongs to an allocator of another size")
        if mapping.dtype != torch.int64 or mapping.device != self.device:
            raise InvalidStateError(f"state.mapping is not an int64 tensor on {self.device}")
        if int(mapping[-1]) != -1:
            raise InvalidStateError("state.mapping has lost its sentinel -1")
        self.full_attn_allocator.restore_state(state.full)
        self.swa_attn_allocator.restore_state(state.swa)
        self.full_to_swa_index_mapping.copy_(mapping)

    def clear(self) -> None:
        """Everything free, the mapping zero but for the sentinel, no free group open."""
        self.full_attn_allocator.clear()
        self.swa_attn_allocator.clear()
        self.full_to_swa_index_mapping.zero_()
        self.full_to_swa_index_mapping[-1] = -1

    def _token_pools(self, call: str) -> tuple[TokenToKVPoolAllocator, TokenToKVPoolAllocator]:
        full, swa = self.full_attn_allocator, self.swa_attn_allocator
        if not (isinstance(full, TokenToKVPoolAllocator) and isinstance(swa, TokenToKVPoolAllocator)):
            raise UnsupportedOperationError(f"{call} needs page_size 1; this allocator has page_size {self.page_size}")
        return full, swa

    def _paged_pools(self, call: str) -> tuple[PagedTokenToKVPoolAllocator, PagedTokenToKVPoolAllocator]:
        full, swa = self.full_attn_allocator, self.swa_attn_allocator
        if not (isinstance(full, PagedTokenToKVPoolAllocator) and isinstance(swa, PagedTokenToKVPoolAllocator)):
            raise UnsupportedOperationError(
                f"{call} needs page_size > 1; this allocator has page_size {self.page_size}"
            )
        return full, swa
