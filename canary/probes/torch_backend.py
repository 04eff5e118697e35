"""Torch implementation of the model-free probes (any device), a short fixed sequence of
whole-tensor operations: the probes run after every step of the state machines, on small
pools, where each operation's fixed cost is what counts.

1. One histogram `counts` (int64, like the sums it feeds). Region PEER: bin m for each entry
   m clamped to -2..swa_slots; negative bins wrap to the end of `counts` (put takes
   Python-style negative indices), so entries need no shift. FREE_FULL / FREE_SWA: bin v + 1
   of each free-list value v clamped to -1..units + 1. Two bins read as constants: ZERO is
   never counted, ONE starts at 1. On CUDA, entries with no peer are spread over bins of
   their own (SPREAD) instead of millions of atomic adds on one counter.
2. `positive` = counts > 0, `repeated` = counts > a per-bin threshold (1 where a value may
   appear once, 0 where it may not appear at all).
3. Tables over the PEER bins answer, for each entry with one gather, whether its peer is
   faulty (negative, past the pool, or in a free SWA unit) and whether it lies in the SWA
   padding page.
4. Every check's flags are taken from one concatenation `sources` into plan order by one
   cached index; each probe's items are followed by K constant-true separators coded -1.
5. One cumulative sum ranks the flags; a binary search finds each probe's first K flagged
   positions, and a second search in the run starts turns positions into codes.
Every constant depends only on the geometry, the plan and the device, and is built once: on
the order of a hundred bytes per token, which the Triton path (the default on CUDA) does
without.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from canary.probes.plan import AMOUNTS, Kind, Plan, encode

_INT64_MAX = torch.iinfo(torch.int64).max


def _on(device: torch.device, values: Tensor | int) -> Tensor:
    """A constant built on the host, copied to the device without a synchronisation. Python
    numbers become 0-dim tensors: an operation with a tensor argument skips wrapping a number
    at each call."""
    if not isinstance(values, Tensor):
        values = torch.tensor(values, dtype=torch.int64)
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

        # Histogram regions: PEER first (bins 0..swa_slots; -2 and -1 wrap to the last two).
        self.zero_bin = swa_slots + 1
        self.one_bin = self.zero_bin + 1
        self.free_full = self.one_bin + 1
        self.free_swa = self.free_full + full_units + 3
        self.spread = self.free_swa + swa_units + 3
        spread = device.type == "cuda"
        self.size = self.spread + (entries + 1 if spread else 0) + 2
        # Entries clamp to -2..swa_slots; the sentinel always to -1, whose bin nothing reads,
        # so that it never counts as a peer (its own check reads `holds`).
        # (Constants are built with whole-tensor operations, never by assigning numbers
        # through indexing: the first call may run under a guard against host copies.)
        sentinel = torch.arange(entries + 1) == entries
        self.peer_low = _on(device, torch.where(sentinel, -1, -2))
        self.peer_high = _on(device, torch.where(sentinel, -1, swa_slots))
        self.unpaired = _on(device, -sentinel.long())  # holds = mapping != unpaired: "held", or a wrong sentinel
        self.spread_bins = _on(device, torch.arange(self.spread, self.spread + entries + 1)) if spread else None
        bins = torch.arange(self.size)
        self.empty_counts = _on(device, (bins == self.one_bin).long())  # counting starts from a copy of this
        self.unit = _on(device, torch.ones(1, dtype=torch.int64))
        self.no_excess = _on(device, torch.zeros(3, dtype=torch.int64))
        thresholds = torch.where((bins >= 1) & (bins < swa_slots), 1, _INT64_MAX)  # SWA slots 1..swa_slots-1
        for start, units in ((self.free_full, full_units), (self.free_swa, swa_units)):
            once = (bins >= start + 2) & (bins <= start + units + 1)  # values 1..units
            thresholds = torch.where((bins >= start) & (bins < start + units + 3), once.long(), thresholds)
        self.thresholds = _on(device, thresholds)

        # Per PEER bin (slots 0..swa_slots-1, then >= swa_slots, < -1, -1): the bin of
        # `positive` that says whether an entry there points at a faulty peer.
        slots = torch.arange(swa_slots)
        fault = torch.where(slots == 0, self.zero_bin, self.free_swa + slots // ps + 1)  # slot 0: no peer
        self.fault_table = _on(device, torch.cat((fault, torch.full((3,), self.one_bin))))
        self.pad_page_table = _on(device, torch.cat(((slots >= 1) & (slots < ps), torch.zeros(3, dtype=torch.bool))))
        self.row_free = _on(
            device,
            torch.cat((self.free_full + 1 + torch.arange(entries) // ps, torch.tensor([self.zero_bin]))),
        )
        self.offsets_in_page = _on(device, torch.arange(ps))
        self.minus_one, self.ps_t = _on(device, -1), _on(device, ps)
        self.full_bound, self.swa_bound = _on(device, full_units + 1), _on(device, swa_units + 1)
        self.full_shift, self.swa_shift = _on(device, self.free_full + 1), _on(device, self.free_swa + 1)
        self.zero, self.largest = _on(device, 0), _on(device, _INT64_MAX)

        # Which sources the plan reads, and where each starts in `sources`.
        self.fault, self.pad_page = Kind.PEER_FAULT in kinds, Kind.PAD_PAGE_PEER in kinds
        self.repeated_kinds = bool(
            kinds & {Kind.FULL_FREE_PAD, Kind.SWA_FREE_PAD, Kind.FULL_FREE_BINS, Kind.SWA_FREE_BINS, Kind.SHARED_SLOT}
        )
        self.holds_kinds = bool(kinds & {Kind.PAD_ROW, Kind.SENTINEL})
        self.stale, self.page, self.orphan = Kind.STALE in kinds, Kind.PAGE in kinds, Kind.ORPHAN in kinds
        self.excess = Kind.FULL_EXCESS in kinds
        base = {"false": 0, "true": 1}
        length = 2
        for source, present, size in (
            ("repeated", self.repeated_kinds, self.size),
            ("fault", self.fault, entries + 1),
            ("pad_page", self.pad_page, entries + 1),
            ("holds", self.holds_kinds, entries + 1),
            ("stale", self.stale, entries + 1),
            ("page", self.page, entries),
            ("orphan", self.orphan, swa_units),
            ("excess", self.excess, 3),
        ):
            if present:
                base[source] = length
                length += size
        self.constants = _on(device, torch.tensor([False, True]))

        def items(kind: Kind) -> Tensor:
            """Where in `sources` each item of a kind's index space lies."""
            each = torch.arange(geometry.span(kind)[1])
            match kind:
                case Kind.SENTINEL:
                    return torch.tensor([base["holds"] + entries])
                case Kind.PAD_ROW:
                    return base["holds"] + each
                case Kind.PEER_FAULT:
                    return base["fault"] + each
                case Kind.PAD_PAGE_PEER:
                    return base["pad_page"] + each
                case Kind.FULL_FREE_PAD | Kind.SWA_FREE_PAD:
                    start = self.free_full if kind is Kind.FULL_FREE_PAD else self.free_swa
                    return torch.tensor([base["repeated"] + start + 1])
                case Kind.FULL_FREE_BINS | Kind.SWA_FREE_BINS:
                    start = self.free_full if kind is Kind.FULL_FREE_BINS else self.free_swa
                    return base["repeated"] + start + each
                case Kind.SHARED_SLOT:
                    return base["repeated"] + 1 + each
                case Kind.FULL_EXCESS | Kind.SWA_EXCESS:
                    return torch.tensor([base["excess"] + (kind is Kind.SWA_EXCESS)])
                case Kind.ORPHAN:
                    return base["orphan"] + each
                case Kind.STALE:
                    return base["stale"] + each
                case Kind.PAGE:
                    return base["page"] + each
            raise AssertionError(kind)

        # Position 0 is constant false, so that "ranks before the first probe" reads 0. Each
        # probe's items are followed by K constant-true separators coded -1: its first K
        # flagged positions are its items, then the padding, never another probe's items.
        order = [torch.tensor([base["false"]])]
        run_starts: list[int] = []
        run_offsets: list[int] = []
        bounds: list[tuple[int, int]] = []
        amount_runs: dict[Kind, int] = {}
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
            for _ in range(plan.max_indices):
                run_starts.append(position)
                run_offsets.append(-1 - position)
                position += 1
            order.append(torch.full((plan.max_indices,), base["true"]))
        self.order = _on(device, torch.cat(order).to(torch.int32))
        self.run_starts = _on(device, torch.tensor(run_starts))
        # run_of (from searchsorted) is 1 + the run's index; the last entry takes unused amounts.
        self.offsets = _on(device, torch.tensor([0, *run_offsets, 0]))
        spare = len(run_offsets) + 1
        self.amount_runs = _on(
            device,
            torch.tensor([amount_runs.get(Kind.FULL_EXCESS, spare), amount_runs.get(Kind.SWA_EXCESS, spare), spare]),
        )
        bounds_table = torch.tensor(bounds, dtype=torch.int64)
        self.bounds = _on(device, bounds_table.T.reshape(2, -1, 1).contiguous())
        self.steps = _on(device, torch.arange(1, plan.max_indices + 1))

        # CONSERVE: excess = free-list length + units in use - units, per pool, by one
        # index_add over (FREE_FULL and FREE_SWA bins, full units with an entry, SWA units
        # pointed into, -units); pool 2 takes what neither pool counts (unit 0, the sentinel).
        rows_held = entries + 1 if ps == 1 else self.rows  # at ps 1 the rows are the entries
        rows = torch.arange(rows_held)
        pool_of = torch.where((rows >= 1) & (rows <= full_units), 0, 2)
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


@functools.lru_cache(maxsize=512)  # the state machines draw hundreds of small pool shapes
def _layout(plan: Plan, device: torch.device) -> _Layout:
    return _Layout(plan, device)


def pack(mapping: Tensor, full_free: Tensor, swa_free: Tensor, plan: Plan) -> Tensor:
    """The packed rows of `plan`'s probes (without host findings), int64 [P, K + 1]."""
    device = mapping.device
    layout = _layout(plan, device)
    if not mapping.is_contiguous():
        mapping = mapping.contiguous()  # pages are read through as_strided
    ps = layout.ps

    peer_bin = mapping.clamp(layout.peer_low, layout.peer_high)
    holds = mapping != layout.unpaired
    if layout.spread_bins is not None:
        peer_bin_counted = torch.where(holds, peer_bin, layout.spread_bins)
    else:
        peer_bin_counted = peer_bin  # entries with no peer fall in bin 0 (slot 0), read by nothing
    index = torch.cat(
        (
            peer_bin_counted,
            full_free.clamp(layout.minus_one, layout.full_bound).add_(layout.full_shift),
            swa_free.clamp(layout.minus_one, layout.swa_bound).add_(layout.swa_shift),
        )
    )
    counts = layout.empty_counts.put(index, layout.unit.expand(index.shape[0]), accumulate=True)
    positive = counts > layout.zero

    sources = [layout.constants]
    if layout.repeated_kinds:
        sources.append(counts > layout.thresholds)
    if layout.fault:
        sources.append(positive.take(layout.fault_table).take(peer_bin))
    if layout.pad_page:
        sources.append(layout.pad_page_table.take(peer_bin))
    if layout.holds_kinds:
        sources.append(holds)
    if layout.stale:
        sources.append(positive.take(layout.row_free) & holds)
    if ps > 1 and (layout.page or layout.excess):
        held = holds.as_strided((layout.rows, ps), (ps, 1))
    if layout.page:
        # A token paired correctly maps to (its SWA page) * ps + (its own offset), so
        # entry - offset is the same multiple of ps for every held token of the page.
        base = mapping.as_strided((layout.rows, ps), (ps, 1)) - layout.offsets_in_page
        masked = torch.where(held, base, layout.largest)
        smallest = masked.amin(1, keepdim=True)
        unaligned = torch.remainder(smallest, layout.ps_t) != layout.zero
        sources.append(((masked != smallest) | unaligned).logical_and_(held).view(-1))
    if layout.orphan or layout.excess:
        # SWA units 1..swa_units that some entry points into (slots and bins from ps).
        used = positive.as_strided((layout.swa_units, ps), (ps, 1), ps).any(1)
    if layout.orphan:
        free_units = positive.as_strided((layout.swa_units,), (1,), layout.free_swa + 2)
        sources.append((used | free_units).logical_not_())
    offsets = layout.offsets
    if layout.excess:
        free_bins = counts.as_strided((layout.spread - layout.free_full,), (1,), layout.free_full)
        rows_held = holds if ps == 1 else held.any(1)
        # One dtype: a mixed concatenation costs more than the conversions.
        amounts = torch.cat((free_bins, rows_held.long(), used.long(), layout.minus_units))
        excess = layout.no_excess.index_add(0, layout.pool_of, amounts)
        sources.append(excess > layout.zero)
        offsets = offsets.index_add(0, layout.amount_runs, excess)

    flags = torch.cat(sources).index_select(0, layout.order)
    ranks = flags.cumsum(0)
    before, through = ranks.take(layout.bounds).unbind(0)  # [P, 1] each: ranks before / through a probe
    positions = torch.searchsorted(ranks, before + layout.steps)
    codes = positions + offsets.take(torch.searchsorted(layout.run_starts, positions, right=True))
    return torch.cat((through - before, codes), dim=1)
