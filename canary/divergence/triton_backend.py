"""Fused Triton implementation of the divergence detector (imported lazily by canary.divergence).

Two launches, each over a (request, block of positions) grid:
1. `_scan_kernel` reads each live req_to_token entry once, gathers its SWA slot and adds the
   window / leak / evict / non-identity counts. Each slot-holding token does one atomic max of
   its full index into the slot's holder entry; the previous value it gets back tells it
   whether a different full token got there first, and if so it marks the slot as clashing.
   Whichever order the tokens arrive in, the first arrival of a second distinct full index
   sees the other one, so a slot is marked exactly when it has two distinct holders: the
   result is deterministic. Blocks holding any slot write their slots to an int32 scratch
   and raise a per-block flag.
2. `_shared_kernel` re-reads only the flagged blocks' scratch and counts tokens whose slot
   is marked.

Blocks past a request's scan length do no memory traffic, and blocks with no slot-holding
token skip the scratch, so the cost follows live tokens, not max_context. Semantics match
`canary.divergence` exactly (see its module docstring).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

# Kernels are built for the interpreter when TRITON_INTERPRET=1 was set at import time; only
# then may they run on CPU tensors.
INTERPRETED: bool = bool(knobs.runtime.interpret)

_MAX_BLOCK = 1024
_MIN_BLOCK = 16
# Holder entries start below every full index; clash flags start unset.
_NO_HOLDER = tl.constexpr(-1)

# Rows of the [5, B] counts tensor, in DivergenceCounts field order after `live`.
_WINDOW_MISSING, _LEAKED, _EVICTED, _NON_IDENTITY, _SHARED = (tl.constexpr(row) for row in range(5))


@triton.jit
def _block_positions(req_pool_indices_ptr, seq_lens_ptr, num_rows, max_context, BLOCK: tl.constexpr):
    """This program's positions, the live mask over them, and whether any is live."""
    req = tl.program_id(0).to(tl.int64)  # req * max_context indexes a scratch that may pass 2**31
    block_start = tl.program_id(1).to(tl.int64) * BLOCK
    row = tl.load(req_pool_indices_ptr + req)
    seq_len = tl.load(seq_lens_ptr + req)
    scan_len = tl.minimum(tl.maximum(seq_len, 0), max_context)
    scan_len = tl.where((row >= 0) & (row < num_rows), scan_len, 0)
    positions = block_start + tl.arange(0, BLOCK).to(tl.int64)
    return req, row, seq_len, positions, positions < scan_len, block_start < scan_len


@triton.jit
def _scan_kernel(
    req_to_token_ptr, stride_row, stride_pos, num_rows, max_context,
    req_pool_indices_ptr, seq_lens_ptr, evict_floors_ptr,
    mapping_ptr, mapping_len, window, page_size, swa_slots,
    slots_ptr, block_flags_ptr, holders_ptr, counts_ptr, batch,
    HAS_EVICT_FLOORS: tl.constexpr, BLOCK: tl.constexpr,
):
    req, row, seq_len, positions, live, any_live = _block_positions(
        req_pool_indices_ptr, seq_lens_ptr, num_rows, max_context, BLOCK
    )
    if any_live:
        full = tl.load(req_to_token_ptr + row * stride_row + positions * stride_pos, mask=live, other=0)
        full = full.to(tl.int64)
        in_mapping = (full >= 0) & (full < mapping_len)
        slot = tl.load(mapping_ptr + full, mask=live & in_mapping, other=0)
        holds = live & (slot > 0)
        no_slot = live & (slot <= 0)

        window_start = tl.maximum(seq_len - window, 0)
        if HAS_EVICT_FLOORS:
            boundary = tl.load(evict_floors_ptr + req)
        else:
            boundary = window_start // page_size * page_size
        before_boundary = positions < boundary

        window_missing = tl.sum((no_slot & (positions >= window_start)).to(tl.int64), axis=0)
        leaked = tl.sum((holds & before_boundary).to(tl.int64), axis=0)
        evicted = tl.sum((no_slot & before_boundary).to(tl.int64), axis=0)
        non_identity = tl.sum((holds & (slot != full)).to(tl.int64), axis=0)
        tl.atomic_add(counts_ptr + _WINDOW_MISSING * batch + req, window_missing, sem="relaxed")
        tl.atomic_add(counts_ptr + _LEAKED * batch + req, leaked, sem="relaxed")
        tl.atomic_add(counts_ptr + _EVICTED * batch + req, evicted, sem="relaxed")
        tl.atomic_add(counts_ptr + _NON_IDENTITY * batch + req, non_identity, sem="relaxed")

        # Slots outside [1, swa_slots) have no holder entry; scratch 0 tells pass 2 to skip them.
        tracked = holds & (slot < swa_slots)
        any_tracked = tl.max(tracked.to(tl.int8), axis=0)
        tl.store(block_flags_ptr + req * tl.num_programs(1) + tl.program_id(1), any_tracked)
        if any_tracked != 0:
            tl.store(slots_ptr + req * max_context + positions, tl.where(tracked, slot, 0).to(tl.int32), mask=live)
            full32 = full.to(tl.int32)
            previous = tl.atomic_max(holders_ptr + slot, full32, mask=tracked, sem="relaxed")
            clash = tracked & (previous != _NO_HOLDER) & (previous != full32)
            tl.store(holders_ptr + swa_slots + slot, 1, mask=clash)


@triton.jit
def _shared_kernel(
    req_pool_indices_ptr, seq_lens_ptr, num_rows, max_context,
    slots_ptr, block_flags_ptr, holders_ptr, swa_slots, counts_ptr, batch,
    BLOCK: tl.constexpr,
):
    req, row, seq_len, positions, live, any_live = _block_positions(
        req_pool_indices_ptr, seq_lens_ptr, num_rows, max_context, BLOCK
    )
    if any_live:
        # Flags are only read for blocks with a live token, which pass 1 always wrote.
        if tl.load(block_flags_ptr + req * tl.num_programs(1) + tl.program_id(1)) != 0:
            slot = tl.load(slots_ptr + req * max_context + positions, mask=live, other=0)
            tracked = slot > 0
            clashing = tl.load(holders_ptr + swa_slots + slot, mask=tracked, other=0) == 1
            shared = tracked & clashing
            tl.atomic_add(counts_ptr + _SHARED * batch + req, tl.sum(shared.to(tl.int64), axis=0), sem="relaxed")


def count_divergence(
    req_to_token: Tensor,
    req_pool_indices: Tensor,
    seq_lens: Tensor,
    window: int,
    mapping: Tensor,
    page_size: int,
    evict_floors: Tensor | None,
    swa_slots: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """window_missing, leaked, evicted, non_identity, shared: [B] int64 each, inputs pre-checked."""
    device = req_to_token.device
    batch = req_pool_indices.shape[0]
    num_rows, max_context = req_to_token.shape
    counts = torch.zeros((5, batch), dtype=torch.int64, device=device)
    if batch == 0 or max_context == 0:
        return _rows(counts)

    # Short rows still spread over about four programs each; long rows use the largest block.
    block = max(_MIN_BLOCK, min(_MAX_BLOCK, triton.next_power_of_2(max_context) // 4))
    grid = (batch, triton.cdiv(max_context, block))
    # Pass 2 reads only what pass 1 wrote (flags of live blocks, scratch of flagged blocks),
    # so neither needs a zero-fill.
    slots = torch.empty((batch, max_context), dtype=torch.int32, device=device)
    block_flags = torch.empty(grid, dtype=torch.int8, device=device)
    # Row 0: largest full holder seen per slot; row 1: clash flag (1 = two distinct holders).
    holders = torch.full((2, swa_slots), _NO_HOLDER.value, dtype=torch.int32, device=device)
    seq_lens = seq_lens.contiguous()
    req_pool_indices = req_pool_indices.contiguous()
    mapping = mapping.contiguous()
    floors = evict_floors.contiguous() if evict_floors is not None else seq_lens

    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        _scan_kernel[grid](
            req_to_token, req_to_token.stride(0), req_to_token.stride(1), num_rows, max_context,
            req_pool_indices, seq_lens, floors,
            mapping, mapping.numel(), window, page_size, swa_slots,
            slots, block_flags, holders, counts, batch,
            HAS_EVICT_FLOORS=evict_floors is not None, BLOCK=block,
        )
        _shared_kernel[grid](
            req_pool_indices, seq_lens, num_rows, max_context,
            slots, block_flags, holders, swa_slots, counts, batch,
            BLOCK=block,
        )
    return _rows(counts)


def _rows(counts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    window_missing, leaked, evicted, non_identity, shared = counts.unbind(0)
    return window_missing, leaked, evicted, non_identity, shared
