"""Fused Triton implementation of the model-free probes (imported lazily by canary.probes).

Five launches after one zero-fill of the counters, each over fixed grids (nothing of
data-dependent shape, no host synchronisation, capturable in a CUDA graph):
1. `_count_free_kernel` counts the free lists' values into bins (v + 1 for v clamped to
   -1..units + 1), one atomic add per free-list entry.
2. `_entry_kernel` reads the mapping once, a tile of whole full pages per program: it counts
   each entry's SWA slot (one atomic add per entry with a peer), full pages with an entry, and
   per block the entries failing each per-entry check (PAD_PAGE_PEER, PEER_FAULT, STALE, PAGE).
3. `_unit_kernel` reads the slot counts per SWA unit (SHARED_SLOT, ORPHAN, units pointed into)
   and the free-list bins (FULL_FREE_BINS, SWA_FREE_BINS), counting per block.
4. `_finish_kernel`, one program, turns block counts into each block's rank within its probe
   (prefix sums in check order), checks the one-item kinds (SENTINEL, the padding units,
   PAD_ROW, the CONSERVE amounts) and writes every row's count, those items and the padding.
5. `_collect_kernel` revisits only the blocks that hold one of their probe's first K items and
   writes those items' codes.
The checks and their order are `canary.probes.plan`'s; the results equal the torch
implementation's exactly.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

from canary.probes.plan import CHECK_DETAILS, Kind, Plan

# Kernels are built for the interpreter when TRITON_INTERPRET=1 was set at import time; only
# then may they run on CPU tensors.
INTERPRETED: bool = bool(knobs.runtime.interpret)

_TILE = 2048
"""Items per program in every pass."""
_CHUNK = 1024
"""Block counts the finishing program scans at a time."""
_MAX_PROBES = len(CHECK_DETAILS)
"""Rows of the finishing program's tile: every model-free probe fits."""
_INT64_MAX = tl.constexpr(9223372036854775807)
_TAG_SHIFT = tl.constexpr(40)

# Kind ids (see canary._probe_plan.Kind), as constexprs for the kernels.
_SENTINEL = tl.constexpr(int(Kind.SENTINEL))
_FULL_FREE_PAD = tl.constexpr(int(Kind.FULL_FREE_PAD))
_SWA_FREE_PAD = tl.constexpr(int(Kind.SWA_FREE_PAD))
_PAD_ROW = tl.constexpr(int(Kind.PAD_ROW))
_PAD_PAGE_PEER = tl.constexpr(int(Kind.PAD_PAGE_PEER))
_FULL_FREE_BINS = tl.constexpr(int(Kind.FULL_FREE_BINS))
_SWA_FREE_BINS = tl.constexpr(int(Kind.SWA_FREE_BINS))
_FULL_EXCESS = tl.constexpr(int(Kind.FULL_EXCESS))
_SWA_EXCESS = tl.constexpr(int(Kind.SWA_EXCESS))
_SHARED_SLOT = tl.constexpr(int(Kind.SHARED_SLOT))
_PEER_FAULT = tl.constexpr(int(Kind.PEER_FAULT))
_ORPHAN = tl.constexpr(int(Kind.ORPHAN))
_STALE = tl.constexpr(int(Kind.STALE))
_PAGE = tl.constexpr(int(Kind.PAGE))
_KINDS = tl.constexpr(len(Kind))

# Sizes vary from pool to pool: compiling a variant per size class (== 1, multiple of 16)
# would only cost time.
_SIZES = [
    "full_len", "swa_len", "full_units", "swa_units", "full_blocks", "full_bins_at", "swa_bins_at", "counters_at",
    "rows_total", "ps", "swa_slots", "entries", "entry_blocks", "unit_blocks", "full_bin_blocks", "swa_bin_blocks",
    "probes", "width",
]


# ------------------------------------------------------------------ layout
@triton.jit
def _block_at(kind: tl.constexpr, entry_blocks, unit_blocks, full_bin_blocks):
    """Where a blocked kind's per-block counts start (entry kinds, unit kinds, then bins)."""
    if kind == _PAD_PAGE_PEER:
        at = 0
    elif kind == _PEER_FAULT:
        at = entry_blocks
    elif kind == _STALE:
        at = 2 * entry_blocks
    elif kind == _PAGE:
        at = 3 * entry_blocks
    elif kind == _SHARED_SLOT:
        at = 4 * entry_blocks
    elif kind == _ORPHAN:
        at = 4 * entry_blocks + unit_blocks
    elif kind == _FULL_FREE_BINS:
        at = 4 * entry_blocks + 2 * unit_blocks
    else:
        at = 4 * entry_blocks + 2 * unit_blocks + full_bin_blocks
    return at


# ------------------------------------------------------------------ flags
@triton.jit
def _entry_flags(
    mapping_ptr, counts_ptr, block, full_bins_at, swa_bins_at, rows_total, ps, swa_slots,
    ROWS: tl.constexpr, PSP: tl.constexpr, PAGED: tl.constexpr,
):
    """One tile of whole full pages: entry indices, the entries, and each entry check's flags."""
    rows = block.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)[:, None]
    cols = tl.arange(0, PSP).to(tl.int64)[None, :]
    valid = (rows < rows_total) & (cols < ps)
    entry = rows * ps + cols
    m = tl.load(mapping_ptr + entry, mask=valid, other=0)
    held = valid & (m != 0)
    slot = valid & (m >= 1) & (m < swa_slots)
    unit_free = tl.load(counts_ptr + swa_bins_at + m // ps + 1, mask=slot, other=0) > 0
    fault = valid & ((m < 0) | (m >= swa_slots) | (slot & unit_free))
    pad_page = slot & (m < ps)
    row_free = tl.load(counts_ptr + full_bins_at + rows + 1, mask=rows < rows_total, other=0) > 0
    stale = held & row_free
    if PAGED:
        # A token paired correctly maps to (its SWA page) * ps + (its own offset), so
        # entry - offset is the same multiple of ps for every held token of the page.
        masked = tl.where(held, m - cols, _INT64_MAX)
        smallest = tl.min(masked, axis=1)[:, None]
        page = held & ((masked != smallest) | (smallest % ps != 0))
    else:
        page = tl.zeros_like(held)
    return rows, entry, m, held, slot, fault, pad_page, stale, page


@triton.jit
def _unit_flags(counts_ptr, block, swa_bins_at, swa_units, ps, ROWS: tl.constexpr, PSP: tl.constexpr):
    """One tile of whole SWA units: slots, units, and the slot / unit checks' flags."""
    units = block.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, PSP).to(tl.int64)[None, :]
    slot = units[:, None] * ps + cols
    valid = (units[:, None] <= swa_units) & (cols < ps)
    refs = tl.load(counts_ptr + slot, mask=valid, other=0)
    shared = valid & (slot >= 1) & (refs > 1)
    used = tl.max((refs > 0).to(tl.int32), axis=1) > 0
    counted = (units >= 1) & (units <= swa_units)
    free = tl.load(counts_ptr + swa_bins_at + units + 1, mask=counted, other=0) > 0
    orphan = counted & ~used & ~free
    return units, slot, shared, used & counted, orphan


@triton.jit
def _bin_flags(counts_ptr, block, bins_at, units, BLOCK: tl.constexpr):
    """Free-list bins repeated or out of range: bin b holds value b - 1."""
    bins = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = bins < units + 3
    count = tl.load(counts_ptr + bins_at + bins, mask=valid, other=0)
    once = (bins >= 2) & (bins <= units + 1)
    return bins, valid & (count > once.to(tl.int32))


# ------------------------------------------------------------------ passes
# Free lists may be views at any offset (sglang slices its free list from the front).
@triton.jit(do_not_specialize=_SIZES, do_not_specialize_on_alignment=["full_free_ptr", "swa_free_ptr"])
def _count_free_kernel(
    full_free_ptr, full_len, swa_free_ptr, swa_len, counts_ptr, full_bins_at, swa_bins_at,
    full_units, swa_units, full_blocks, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < full_blocks:
        offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < full_len
        value = tl.load(full_free_ptr + offsets, mask=valid, other=0)
        bins = full_bins_at + tl.minimum(tl.maximum(value, -1), full_units + 1) + 1
    else:
        offsets = (pid - full_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < swa_len
        value = tl.load(swa_free_ptr + offsets, mask=valid, other=0)
        bins = swa_bins_at + tl.minimum(tl.maximum(value, -1), swa_units + 1) + 1
    tl.atomic_add(counts_ptr + bins, 1, mask=valid, sem="relaxed")


@triton.jit(do_not_specialize=_SIZES)
def _entry_kernel(
    mapping_ptr, counts_ptr, block_counts_ptr, full_bins_at, swa_bins_at, counters_at,
    rows_total, ps, swa_slots, entry_blocks,
    ROWS: tl.constexpr, PSP: tl.constexpr, PAGED: tl.constexpr,
):
    block = tl.program_id(0)
    rows, entry, m, held, slot, fault, pad_page, stale, page = _entry_flags(
        mapping_ptr, counts_ptr, block, full_bins_at, swa_bins_at, rows_total, ps, swa_slots, ROWS, PSP, PAGED
    )
    tl.atomic_add(counts_ptr + m, 1, mask=slot, sem="relaxed")
    # Full units (rows 1..) with an entry, for CONSERVE.
    row_ids = block.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_use = (tl.max(held.to(tl.int32), axis=1) > 0) & (row_ids >= 1)
    tl.atomic_add(counts_ptr + counters_at, tl.sum(in_use.to(tl.int32)), sem="relaxed")
    tl.store(block_counts_ptr + block, tl.sum(pad_page.to(tl.int32)))
    tl.store(block_counts_ptr + entry_blocks + block, tl.sum(fault.to(tl.int32)))
    tl.store(block_counts_ptr + 2 * entry_blocks + block, tl.sum(stale.to(tl.int32)))
    tl.store(block_counts_ptr + 3 * entry_blocks + block, tl.sum(page.to(tl.int32)))


@triton.jit(do_not_specialize=_SIZES)
def _unit_kernel(
    counts_ptr, block_counts_ptr, full_bins_at, swa_bins_at, counters_at, full_units, swa_units, ps,
    entry_blocks, unit_blocks, full_bin_blocks,
    ROWS: tl.constexpr, PSP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < unit_blocks:
        units, slot, shared, used, orphan = _unit_flags(counts_ptr, pid, swa_bins_at, swa_units, ps, ROWS, PSP)
        tl.atomic_add(counts_ptr + counters_at + 1, tl.sum(used.to(tl.int32)), sem="relaxed")
        tl.store(block_counts_ptr + _block_at(_SHARED_SLOT, entry_blocks, unit_blocks, full_bin_blocks) + pid,
                 tl.sum(shared.to(tl.int32)))
        tl.store(block_counts_ptr + _block_at(_ORPHAN, entry_blocks, unit_blocks, full_bin_blocks) + pid,
                 tl.sum(orphan.to(tl.int32)))
    elif pid < unit_blocks + full_bin_blocks:
        block = pid - unit_blocks
        bins, repeated = _bin_flags(counts_ptr, block, full_bins_at, full_units, BLOCK)
        tl.store(block_counts_ptr + _block_at(_FULL_FREE_BINS, entry_blocks, unit_blocks, full_bin_blocks) + block,
                 tl.sum(repeated.to(tl.int32)))
    else:
        block = pid - unit_blocks - full_bin_blocks
        bins, repeated = _bin_flags(counts_ptr, block, swa_bins_at, swa_units, BLOCK)
        tl.store(block_counts_ptr + _block_at(_SWA_FREE_BINS, entry_blocks, unit_blocks, full_bin_blocks) + block,
                 tl.sum(repeated.to(tl.int32)))


@triton.jit
def _place(tile, tile_rows, tile_cols, row, column, flag, code, width):
    """The packed tile with `code` at (row, column) when flagged and within the row's K codes."""
    return tl.where((tile_rows == row) & (tile_cols == column) & flag & (column <= width), code, tile)


@triton.jit(do_not_specialize=_SIZES)
def _finish_kernel(
    mapping_ptr, counts_ptr, block_counts_ptr, block_ranks_ptr, plan_ptr, out_ptr,
    entries, ps, full_units, swa_units, full_len, swa_len, full_bins_at, swa_bins_at, counters_at,
    entry_blocks, unit_blocks, full_bin_blocks, swa_bin_blocks, probes, width,
    PP: tl.constexpr, KP1: tl.constexpr, CHUNK: tl.constexpr,
):
    probe_ids = tl.arange(0, PP).to(tl.int64)
    running = tl.zeros([PP], dtype=tl.int64)
    tile_rows = probe_ids[:, None]
    tile_cols = tl.arange(0, KP1).to(tl.int64)[None, :]
    tile = tl.full([PP, KP1], -1, tl.int64)
    for kind in tl.static_range(_KINDS):
        row = tl.load(plan_ptr + 2 * kind)
        tag = tl.load(plan_ptr + 2 * kind + 1) << _TAG_SHIFT
        base = tl.sum(tl.where(probe_ids == row, running, 0))
        total = tl.zeros([], dtype=tl.int64)
        if (kind != _SENTINEL) & (kind != _FULL_FREE_PAD) & (kind != _SWA_FREE_PAD) & (kind != _PAD_ROW) & (
            kind != _FULL_EXCESS
        ) & (kind != _SWA_EXCESS):
            if row >= 0:
                if (kind == _SHARED_SLOT) | (kind == _ORPHAN):
                    blocks = unit_blocks
                elif kind == _FULL_FREE_BINS:
                    blocks = full_bin_blocks
                elif kind == _SWA_FREE_BINS:
                    blocks = swa_bin_blocks
                else:
                    blocks = entry_blocks
                at = _block_at(kind, entry_blocks, unit_blocks, full_bin_blocks)
                for start in range(0, blocks, CHUNK):
                    offsets = start + tl.arange(0, CHUNK)
                    valid = offsets < blocks
                    count = tl.load(block_counts_ptr + at + offsets, mask=valid, other=0).to(tl.int64)
                    before = base + total + tl.cumsum(count, axis=0) - count
                    # Ranks past every row's K never matter; clamp so they fit int32.
                    tl.store(block_ranks_ptr + at + offsets, tl.minimum(before, 2147483647).to(tl.int32), mask=valid)
                    total += tl.sum(count)
        elif kind == _PAD_ROW:
            for column in range(0, ps):
                held = tl.load(mapping_ptr + column) != 0
                tile = _place(tile, tile_rows, tile_cols, row, 1 + base + total, held, tag + column + 1, width)
                total += held.to(tl.int64)
        else:
            if kind == _SENTINEL:
                flag = tl.load(mapping_ptr + entries) != -1
                item = tl.zeros([], dtype=tl.int64) + entries
            elif kind == _FULL_FREE_PAD:
                flag = tl.load(counts_ptr + full_bins_at + 1) > 0
                item = tl.zeros([], dtype=tl.int64)
            elif kind == _SWA_FREE_PAD:
                flag = tl.load(counts_ptr + swa_bins_at + 1) > 0
                item = tl.zeros([], dtype=tl.int64)
            elif kind == _FULL_EXCESS:
                item = tl.load(counts_ptr + counters_at).to(tl.int64) + full_len - full_units
                flag = item > 0
            else:
                item = tl.load(counts_ptr + counters_at + 1).to(tl.int64) + swa_len - swa_units
                flag = item > 0
            tile = _place(tile, tile_rows, tile_cols, row, 1 + base, flag, tag + item + 1, width)
            total = flag.to(tl.int64)
        running += tl.where(probe_ids == row, total, 0)
    tile = tl.where(tile_cols == 0, running[:, None], tile)
    tl.store(out_ptr + tile_rows * (width + 1) + tile_cols, tile, mask=(tile_rows < probes) & (tile_cols <= width))


@triton.jit
def _emit(flags, items, kind: tl.constexpr, block, plan_ptr, block_counts_ptr, block_ranks_ptr, out_ptr,
          entry_blocks, unit_blocks, full_bin_blocks, width, N: tl.constexpr):
    """Write the codes of a block's flagged items that are among their probe's first K."""
    row = tl.load(plan_ptr + 2 * kind)
    at = _block_at(kind, entry_blocks, unit_blocks, full_bin_blocks) + block
    if row >= 0:
        if tl.load(block_counts_ptr + at) > 0:
            first = tl.load(block_ranks_ptr + at)
            if first < width:
                flat = tl.reshape(flags.to(tl.int32), (N,))
                rank = first + tl.cumsum(flat, axis=0) - flat
                code = (tl.load(plan_ptr + 2 * kind + 1) << _TAG_SHIFT) + tl.reshape(items, (N,)) + 1
                tl.store(out_ptr + row * (width + 1) + 1 + rank, code, mask=(flat != 0) & (rank < width))


@triton.jit(do_not_specialize=_SIZES)
def _collect_kernel(
    mapping_ptr, counts_ptr, block_counts_ptr, block_ranks_ptr, plan_ptr, out_ptr,
    full_bins_at, swa_bins_at, rows_total, ps, swa_slots, full_units, swa_units,
    entry_blocks, unit_blocks, full_bin_blocks, width,
    ROWS: tl.constexpr, PSP: tl.constexpr, UNIT_ROWS: tl.constexpr, BLOCK: tl.constexpr, PAGED: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < entry_blocks:
        rows, entry, m, held, slot, fault, pad_page, stale, page = _entry_flags(
            mapping_ptr, counts_ptr, pid, full_bins_at, swa_bins_at, rows_total, ps, swa_slots, ROWS, PSP, PAGED
        )
        _emit(pad_page, entry, _PAD_PAGE_PEER, pid, plan_ptr, block_counts_ptr, block_ranks_ptr, out_ptr,
              entry_blocks, unit_blocks, full_bin_blocks, width, ROWS * PSP)
        _emit(fault, entry, _PEER_FAULT, pid, plan_ptr, block_counts_ptr, block_ranks_ptr, out_ptr,
              entry_blocks, unit_blocks, full_bin_blocks, width, ROWS * PSP)
        _emit(stale, entry, _STALE, pid, plan_ptr, block_counts_ptr, block_ranks_ptr, out_ptr,
              entry_blocks, unit_blocks, full_bin_blocks, width, ROWS * PSP)
        if PAGED:
            _emit(page, entry, _PAGE, pid, plan_ptr, block_counts_ptr, block_ranks_ptr, out_ptr,
                  entry_blocks, unit_blocks, full_bin_blocks, width, ROWS * PSP)
    elif pid < entry_blocks + unit_blocks:
        block = pid - entry_blocks
        units, slot, shared, used, orphan = _unit_flags(counts_ptr, block, swa_bins_at, swa_units, ps, UNIT_ROWS, PSP)
        _emit(shared, slot, _SHARED_SLOT, block, plan_ptr, block_counts_ptr, block_ranks_ptr, out_ptr,
              entry_blocks, unit_blocks, full_bin_blocks, width, UNIT_ROWS * PSP)
        _emit(orphan, units, _ORPHAN, block, plan_ptr, block_counts_ptr, block_ranks_ptr, out_ptr,
              entry_blocks, unit_blocks, full_bin_blocks, width, UNIT_ROWS)
    elif pid < entry_blocks + unit_blocks + full_bin_blocks:
        block = pid - entry_blocks - unit_blocks
        bins, repeated = _bin_flags(counts_ptr, block, full_bins_at, full_units, BLOCK)
        _emit(repeated, bins - 1, _FULL_FREE_BINS, block, plan_ptr, block_counts_ptr, block_ranks_ptr, out_ptr,
              entry_blocks, unit_blocks, full_bin_blocks, width, BLOCK)
    else:
        block = pid - entry_blocks - unit_blocks - full_bin_blocks
        bins, repeated = _bin_flags(counts_ptr, block, swa_bins_at, swa_units, BLOCK)
        _emit(repeated, bins - 1, _SWA_FREE_BINS, block, plan_ptr, block_counts_ptr, block_ranks_ptr, out_ptr,
              entry_blocks, unit_blocks, full_bin_blocks, width, BLOCK)


# ------------------------------------------------------------------ driver
class _Layout:
    """Grid sizes, scratch offsets and the plan table of one plan on one device."""

    def __init__(self, plan: Plan, device: torch.device) -> None:
        geometry = plan.geometry
        ps = geometry.page_size
        self.ps, self.psp = ps, triton.next_power_of_2(ps)
        self.rows = geometry.full_units + 1
        self.full_units, self.swa_units = geometry.full_units, geometry.swa_units
        self.entries, self.swa_slots = geometry.entries, geometry.swa_slots
        self.entry_rows = max(1, _TILE // self.psp)
        self.unit_rows = self.entry_rows
        self.entry_blocks = triton.cdiv(self.rows, self.entry_rows)
        self.unit_blocks = triton.cdiv(self.swa_units + 1, self.unit_rows)
        self.full_bin_blocks = triton.cdiv(self.full_units + 3, _TILE)
        self.swa_bin_blocks = triton.cdiv(self.swa_units + 3, _TILE)
        self.blocks = 4 * self.entry_blocks + 2 * self.unit_blocks + self.full_bin_blocks + self.swa_bin_blocks
        # Scratch (int32, zeroed per call): slot counts, free-list bins, two counters.
        self.full_bins_at = self.swa_slots
        self.swa_bins_at = self.full_bins_at + self.full_units + 3
        self.counters_at = self.swa_bins_at + self.swa_units + 3
        self.scratch = self.counters_at + 2
        self.probes, self.width = len(plan.names), plan.max_indices
        self.paged = ps > 1
        rows_and_tags = {check.kind: (row, check.tag) for row, checks in enumerate(plan.checks) for check in checks}
        table = torch.tensor([rows_and_tags.get(kind, (-1, -1)) for kind in Kind], dtype=torch.int64)
        on_cuda = device.type == "cuda"
        self.plan_table = table.pin_memory().to(device, non_blocking=True) if on_cuda else table.to(device)


@functools.lru_cache(maxsize=64)
def _layout(plan: Plan, device: torch.device) -> _Layout:
    return _Layout(plan, device)


def pack(mapping: Tensor, full_free: Tensor, swa_free: Tensor, plan: Plan) -> Tensor:
    """The packed rows of `plan`'s probes (without host findings), int64 [P, K + 1]."""
    device = mapping.device
    layout = _layout(plan, device)
    mapping, full_free, swa_free = mapping.contiguous(), full_free.contiguous(), swa_free.contiguous()
    counts = torch.zeros(layout.scratch, dtype=torch.int32, device=device)
    block_counts = torch.empty(layout.blocks, dtype=torch.int32, device=device)
    block_ranks = torch.empty(layout.blocks, dtype=torch.int32, device=device)
    out = torch.empty((layout.probes, layout.width + 1), dtype=torch.int64, device=device)
    full_len, swa_len = full_free.numel(), swa_free.numel()
    full_blocks = triton.cdiv(full_len, _TILE)
    free_grid = max(1, full_blocks + triton.cdiv(swa_len, _TILE))
    sizes = dict(full_bins_at=layout.full_bins_at, swa_bins_at=layout.swa_bins_at)
    blocks_of = dict(entry_blocks=layout.entry_blocks, unit_blocks=layout.unit_blocks,
                     full_bin_blocks=layout.full_bin_blocks)
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        _count_free_kernel[(free_grid,)](
            full_free, full_len, swa_free, swa_len, counts, **sizes,
            full_units=layout.full_units, swa_units=layout.swa_units, full_blocks=full_blocks, BLOCK=_TILE,
        )
        _entry_kernel[(layout.entry_blocks,)](
            mapping, counts, block_counts, **sizes, counters_at=layout.counters_at,
            rows_total=layout.rows, ps=layout.ps, swa_slots=layout.swa_slots, entry_blocks=layout.entry_blocks,
            ROWS=layout.entry_rows, PSP=layout.psp, PAGED=layout.paged,
        )
        _unit_kernel[(layout.unit_blocks + layout.full_bin_blocks + layout.swa_bin_blocks,)](
            counts, block_counts, **sizes, counters_at=layout.counters_at,
            full_units=layout.full_units, swa_units=layout.swa_units, ps=layout.ps, **blocks_of,
            ROWS=layout.unit_rows, PSP=layout.psp, BLOCK=_TILE,
        )
        _finish_kernel[(1,)](
            mapping, counts, block_counts, block_ranks, layout.plan_table, out,
            entries=layout.entries, ps=layout.ps, full_units=layout.full_units, swa_units=layout.swa_units,
            full_len=full_len, swa_len=swa_len, **sizes, counters_at=layout.counters_at, **blocks_of,
            swa_bin_blocks=layout.swa_bin_blocks, probes=layout.probes, width=layout.width,
            PP=_MAX_PROBES, KP1=triton.next_power_of_2(layout.width + 1), CHUNK=_CHUNK,
        )
        if layout.width:
            collect_grid = layout.entry_blocks + layout.unit_blocks + layout.full_bin_blocks + layout.swa_bin_blocks
            _collect_kernel[(collect_grid,)](
                mapping, counts, block_counts, block_ranks, layout.plan_table, out, **sizes,
                rows_total=layout.rows, ps=layout.ps, swa_slots=layout.swa_slots,
                full_units=layout.full_units, swa_units=layout.swa_units, **blocks_of, width=layout.width,
                ROWS=layout.entry_rows, PSP=layout.psp, UNIT_ROWS=layout.unit_rows, BLOCK=_TILE, PAGED=layout.paged,
            )
    return out
