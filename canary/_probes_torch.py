"""Torch implementation of the model-free probes (any device), a short fixed sequence of
whole-tensor operations: the probes run after every step of the state machines, on small
pools, where each operation's fixed cost is what counts.

1. One histogram `counts` (int32) over three regions: each mapping entry's SWA bin (PEER: bin
   m + 2 for m clamped to -2..swa_slots, so that -1, the sentinel's value, has a bin of its
   own), the full free list's values (FREE_FULL: bin v + 1 for v clamped to -1..units + 1) and
   the SWA free list's (FREE_SWA). Two extra bins read as constants: ZERO is never counted,
   ONE is counted once by a constant index. On CUDA, entries with no peer are spread over
   bins of their own (SPREAD) instead of millions of atomic adds on one counter.
2. `positive` = counts > 0, `repeated` = counts > a per-bin threshold (1 where a value may
   appear once, 0 where it may not appear at all).
3. A table over the PEER bins answers, for each entry with one gather, whether its peer is
   faulty (negative, past the pool, or in a free SWA unit), in the SWA padding page, and, for
   the sentinel, whether it is not -1.
4. Every check's flags are taken from one concatenation `sources` into plan order by one
   cached index, a constant-false position after each probe (its separator).
5. One cumulative sum ranks the flags; a binary search finds each probe's first K flagged
   positions (positions past the probe's end stop at its separator), and a second search in
   the run starts turns positions into codes.
Every constant depends only on the geometry, the plan and the device, and is built once.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from canary._probe_plan import AMOUNTS, Kind, Plan, encode

_INT64_MAX = torch.iinfo(torch.int64).max
_NEVER = torch.iinfo(torch.int32).max

# Columns of the per-entry table.
_FAULT, _PAD_PAGE = range(2)


def _on(device: torch.device, values: Tensor | int, dtype: torch.dtype = torch.int64) -> Tensor:
    """A constant built on the host, copied to the device without a synchronisation. Python
    numbers become 0-dim tensors: an operation with a tensor argument skips wrapping a number
    at each call."""
    if not isinstance(values, Tensor):
        values = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


class _Layout:
    """The constants of one plan on one device."""

    def __init__(self, plan: Plan, device: torch.device) -> None:
        geometry = plan.geometry
        ps, full_units, swa_units = geometry.page_size, geometry.full_units, geometry.swa_units
        entries, swa_slots = geometry.entries, geometry.swa_slots
        kinds = {check.kind for checks in plan.checks for check in checks}
        self.ps, self.rows, self.swa_units = ps, full_units + 1, swa_units
        int32 = dict(dtype=torch.int32)

        # Histogram regions.
        self.peer = 0
        peer_bins = swa_slots + 3
        self.zero = peer_bins
        self.one = self.zero + 1
        self.free_full = self.one + 1
        self.free_swa = self.free_full + full_units + 3
        self.spread = self.free_swa + swa_units + 3
        spread = device.type == "cuda"
        self.size = self.spread + (entries + 1 if spread else 0)
        # Entries clamp to -2..swa_slots; the sentinel always to -1, whose bin nothing reads,
        # so that it never counts as a peer (its own check reads `holds`).
        low, high = torch.full((entries + 1,), -2), torch.full((entries + 1,), swa_slots)
        low[-1] = high[-1] = -1
        self.peer_low, self.peer_high = _on(device, low), _on(device, high)
        unpaired = torch.zeros(entries + 1, dtype=torch.int64)
        unpaired[-1] = -1
        self.unpaired = _on(device, unpaired)  # holds = mapping != unpaired: "held", or a wrong sentinel
        self.spread_bins = _on(device, torch.arange(self.spread, self.size)) if spread else None
        self.one_index = _on(device, torch.tensor([self.one]))
        self.unit = _on(device, torch.ones(1, **int32))
        thresholds = torch.full((self.size,), _NEVER, **int32)
        for start, units in ((self.free_full, full_units), (self.free_swa, swa_units)):
            thresholds[start : start + units + 3] = 1
            thresholds[[start, start + 1, start + units + 2]] = 0
        thresholds[self.peer + 3 : self.peer + swa_slots + 2] = 1  # SWA slots 1..swa_slots-1
        self.thresholds = _on(device, thresholds)

        table = torch.full((peer_bins, 2), self.zero)
        slots = torch.arange(1, swa_slots)
        table[:2, _FAULT] = self.one  # m <= -1
        table[slots + 2, _FAULT] = self.free_swa + slots // ps + 1  # is the slot's unit free?
        table[swa_slots + 2, _FAULT] = self.one  # m >= swa_slots
        table[3 : ps + 2, _PAD_PAGE] = self.one  # slots 1..ps-1
        self.table = _on(device, table)
        self.row_free = _on(
            device,
            torch.cat((self.free_full + 1 + torch.arange(entries) // ps, torch.tensor([self.zero]))),
        )
        self.offsets_in_page = _on(device, torch.arange(ps))
        self.two, self.minus_one, self.ps_t = _on(device, 2), _on(device, -1), _on(device, ps)
        self.full_bound, self.swa_bound = _on(device, full_units + 1), _on(device, swa_units + 1)
        self.full_shift, self.swa_shift = _on(device, self.free_full + 1), _on(device, self.free_swa + 1)
        self.zero_i32, self.zero_i64, self.largest = _on(device, 0, torch.int32), _on(device, 0), _on(device, _INT64_MAX)

        # Which sources the plan reads, and where each starts in `sources`.
        self.table_kinds = bool(kinds & {Kind.PEER_FAULT, Kind.PAD_PAGE_PEER})
        self.repeated_kinds = bool(
            kinds & {Kind.FULL_FREE_PAD, Kind.SWA_FREE_PAD, Kind.FULL_FREE_BINS, Kind.SWA_FREE_BINS, Kind.SHARED_SLOT}
        )
        self.holds_kinds = bool(kinds & {Kind.PAD_ROW, Kind.SENTINEL})
        self.stale, self.page, self.orphan = Kind.STALE in kinds, Kind.PAGE in kinds, Kind.ORPHAN in kinds
        self.excess = Kind.FULL_EXCESS in kinds
        base = {"false": 0}
        length = 1
        for source, present, size in (
            ("repeated", self.repeated_kinds, self.size),
            ("table", self.table_kinds, (entries + 1) * 2),
            ("holds", self.holds_kinds, entries + 1),
            ("stale", self.stale, entries + 1),
            ("page", self.page, entries),
            ("orphan", self.orphan, swa_units),
            ("excess", self.excess, 3),
        ):
            if present:
                base[source] = length
                length += size
        self.false = _on(device, torch.zeros(1, dtype=torch.bool))

        def items(kind: Kind) -> Tensor:
            """Where in `sources` each item of a kind's index space lies."""
            each = torch.arange(geometry.span(kind)[1])
            match kind:
                case Kind.SENTINEL:
                    return torch.tensor([base["holds"] + entries])
                case Kind.PAD_ROW:
                    return base["holds"] + each
                case Kind.PAD_PAGE_PEER | Kind.PEER_FAULT:
                    return base["table"] + 2 * each + (_PAD_PAGE if kind is Kind.PAD_PAGE_PEER else _FAULT)
                case Kind.FULL_FREE_PAD | Kind.SWA_FREE_PAD:
                    start = self.free_full if kind is Kind.FULL_FREE_PAD else self.free_swa
                    return torch.tensor([base["repeated"] + start + 1])
                case Kind.FULL_FREE_BINS | Kind.SWA_FREE_BINS:
                    start = self.free_full if kind is Kind.FULL_FREE_BINS else self.free_swa
                    return base["repeated"] + start + each
                case Kind.SHARED_SLOT:
                    return base["repeated"] + self.peer + 3 + each
                case Kind.FULL_EXCESS | Kind.SWA_EXCESS:
                    return torch.tensor([base["excess"] + (kind is Kind.SWA_EXCESS)])
                case Kind.ORPHAN:
                    return base["orphan"] + each
                case Kind.STALE:
                    return base["stale"] + each
                case Kind.PAGE:
                    return base["page"] + each
            raise AssertionError(kind)

        # Position 0 is constant false, so that "ranks before the first probe" reads 0.
        order, run_starts, run_offsets, bounds, separators = [torch.zeros(1, dtype=torch.int64)], [], [], [], []
        amount_runs = {}
        position = 1
        for checks in plan.checks:
            start = position
            for check in checks:
                where = items(check.kind)
                first, _ = geometry.span(check.kind)
                if check.kind in AMOUNTS:
                    amount_runs[check.kind] = len(run_offsets) + 1
                run_starts.append(position)
                run_offsets.append(encode(check.tag, first) - position)
                order.append(where)
                position += where.numel()
            bounds.append((start - 1, position - 1))
            separators.append(position)
            run_starts.append(position)
            run_offsets.append(-1 - position)  # the separator's code is the padding, -1
            order.append(torch.zeros(1, dtype=torch.int64))
            position += 1
        self.order = _on(device, torch.cat(order).to(torch.int32))
        self.run_starts = _on(device, torch.tensor(run_starts))
        # run_of (from searchsorted) is 1 + the run's index; the last entry takes unused amounts.
        self.offsets = _on(device, torch.tensor([0, *run_offsets, 0]))
        spare = len(run_offsets) + 1
        self.amount_runs = _on(
            device, torch.tensor([amount_runs.get(Kind.FULL_EXCESS, spare), amount_runs.get(Kind.SWA_EXCESS, spare), spare])
        )
        bounds = torch.tensor(bounds, dtype=torch.int64)
        self.before, self.through = _on(device, bounds[:, :1].clone()), _on(device, bounds[:, 1:].clone())
        self.separators = _on(device, torch.tensor(separators).reshape(-1, 1))
        self.steps = _on(device, torch.arange(1, plan.max_indices + 1, **int32))

        # CONSERVE: excess = free-list length + units in use - units, per pool, by one
        # index_add over (FREE_FULL and FREE_SWA bins, full units with an entry, SWA units
        # pointed into, -units); pool 2 takes what neither pool counts (unit 0, the sentinel).
        rows_held = entries + 1 if ps == 1 else self.rows  # at ps 1 the rows are the entries
        pool_of = torch.full((rows_held,), 2)
        pool_of[1 : full_units + 1] = 0
        self.pool_of = _on(
            device,
            torch.cat(
                (
                    torch.zeros(full_units + 3, dtype=torch.int64),
                    torch.ones(swa_units + 3, dtype=torch.int64),
                    pool_of,
                    torch.ones(swa_units, dtype=torch.int64),
                    torch.tensor([0, 1]),
                )
            ),
        )
        self.minus_units = _on(device, torch.tensor([-full_units, -swa_units]))


@functools.lru_cache(maxsize=64)
def _layout(plan: Plan, device: torch.device) -> _Layout:
    return _Layout(plan, device)


def pack(mapping: Tensor, full_free: Tensor, swa_free: Tensor, plan: Plan) -> Tensor:
    """The packed rows of `plan`'s probes (without host findings), int64 [P, K + 1]."""
    device = mapping.device
    layout = _layout(plan, device)
    if not mapping.is_contiguous():
        mapping = mapping.contiguous()  # pages are read through as_strided
    ps = layout.ps

    peer_bin = mapping.clamp(layout.peer_low, layout.peer_high).add_(layout.two)
    holds = mapping != layout.unpaired
    if layout.spread_bins is not None:
        peer_bin_counted = torch.where(holds, peer_bin, layout.spread_bins)
    else:
        peer_bin_counted = peer_bin  # entries with no peer fall in bin 2 (slot 0), read by nothing
    index = torch.cat(
        (
            peer_bin_counted,
            full_free.clamp(layout.minus_one, layout.full_bound).add_(layout.full_shift),
            swa_free.clamp(layout.minus_one, layout.swa_bound).add_(layout.swa_shift),
            layout.one_index,
        )
    )
    counts = torch.zeros(layout.size, dtype=torch.int32, device=device)
    counts.index_add_(0, index, layout.unit.expand(index.shape[0]))
    positive = counts > layout.zero_i32

    sources = [layout.false]
    if layout.repeated_kinds:
        sources.append(counts > layout.thresholds)
    if layout.table_kinds:
        sources.append(positive.take(layout.table).index_select(0, peer_bin).view(-1))
    if layout.holds_kinds:
        sources.append(holds)
    if layout.stale:
        sources.append(positive.take(layout.row_free) & holds)
    if layout.page or layout.excess:
        held = holds.as_strided((layout.rows, ps), (ps, 1))
    if layout.page:
        # A token paired correctly maps to (its SWA page) * ps + (its own offset), so
        # entry - offset is the same multiple of ps for every held token of the page.
        base = mapping.as_strided((layout.rows, ps), (ps, 1)) - layout.offsets_in_page
        masked = torch.where(held, base, layout.largest)
        smallest = masked.amin(1, keepdim=True)
        unaligned = torch.remainder(smallest, layout.ps_t) != layout.zero_i64
        sources.append(((masked != smallest) | unaligned).logical_and_(held).view(-1))
    if layout.orphan or layout.excess:
        # SWA units 1..swa_units that some entry points into (slots from ps, bins from ps + 2).
        used = counts.as_strided((layout.swa_units, ps), (ps, 1), layout.peer + ps + 2).any(1)
    if layout.orphan:
        free_units = counts.as_strided((layout.swa_units,), (1,), layout.free_swa + 2)
        sources.append((used + free_units) == layout.zero_i32)
    offsets = layout.offsets
    if layout.excess:
        free_bins = counts.narrow(0, layout.free_full, layout.spread - layout.free_full)
        rows_held = holds if ps == 1 else held.any(1)
        amounts = torch.cat((free_bins, rows_held, used, layout.minus_units))
        excess = torch.zeros(3, dtype=torch.int64, device=device).index_add_(0, layout.pool_of, amounts)
        sources.append(excess > layout.zero_i64)
        offsets = offsets.index_add(0, layout.amount_runs, excess)

    flags = torch.cat(sources).index_select(0, layout.order)
    ranks = flags.cumsum(0, dtype=torch.int32)
    before, through = ranks.take(layout.before), ranks.take(layout.through)  # [P, 1] each
    positions = torch.searchsorted(ranks, before + layout.steps)
    positions = torch.minimum(positions, layout.separators)
    codes = positions + offsets.take(torch.searchsorted(layout.run_starts, positions, right=True))
    return torch.cat((through - before, codes), dim=1)
