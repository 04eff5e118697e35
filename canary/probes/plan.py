"""What the model-free probes check, item by item: the plan both implementations of
`canary.probes.run_probes` (torch and Triton) follow, so that they pack identical results.

A probe is a list of *checks*, each tagged with its position in the probe (the tag that a
packed code carries) and marking offending items in one index space. A packed row is
[count, code_1 .. code_K]: count is the number of offending items over all the probe's
checks; the codes are the first K of them, in check order, then item order, -1-padded. A
code is (tag << TAG_SHIFT) + item + 1.

Index spaces (units are slots at page size 1, pages otherwise; E = (full_units + 1) x ps
mapping entries precede the sentinel):
  SENTINEL        item E: mapping[E] != -1.
  FULL_FREE_PAD   item 0: full unit 0 is in the full free list.
  SWA_FREE_PAD    item 0: SWA unit 0 is in the SWA free list.
  PAD_ROW         items 0..ps-1: the tokens of full page 0 that have an SWA peer.
  PAD_PAGE_PEER   items 0..E-1: entries in 1..ps-1 (SWA padding page 0).
  FULL_FREE_BINS  items -1..full_units+1: free-list values seen twice (1..full_units), or at
                  all (below 0, reported as -1; 0; past the pool).
  SWA_FREE_BINS   the same for the SWA free list.
  FULL_EXCESS     one amount: full units free (with repeats) + full units with an entry,
                  minus full_units, when positive.
  SWA_EXCESS      the same for SWA units and the SWA units that entries point into.
  SHARED_SLOT     items 1..swa_slots-1: SWA slots that two or more entries point at.
  PEER_FAULT      items 0..E-1: entries that are negative, past the SWA pool, or in an SWA
                  unit that is in the SWA free list (slots 1..ps-1 of unit 0 included).
  ORPHAN          items 1..swa_units: SWA units neither free nor pointed into (not checked
                  inside a free group, whose deferred units are neither).
  STALE           items 0..E-1: nonzero entries of full units that are in the full free list.
  PAGE            items 0..E-1 (ps > 1): nonzero entries whose entry - offset differs from
                  the smallest such value of their full page, or all of the page's nonzero
                  entries when that smallest value is not a multiple of ps.
Entries are counted as nonzero (held) when they are not 0; the sentinel is never an entry.
Findings from host-known sizes (CONSERVE's sizes, AVAIL) need no device work: they come
before the probe's device items.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from canary.invariants import Name

TAG_SHIFT = 40
"""A code is (tag << TAG_SHIFT) + item + 1: items are >= -1, so codes never collide with -1."""


def encode(tag: int, item: int) -> int:
    return (tag << TAG_SHIFT) + item + 1


def decode(code: int) -> tuple[int, int]:
    return code >> TAG_SHIFT, (code & ((1 << TAG_SHIFT) - 1)) - 1


class Kind(enum.IntEnum):
    SENTINEL = 0
    FULL_FREE_PAD = 1
    SWA_FREE_PAD = 2
    PAD_ROW = 3
    PAD_PAGE_PEER = 4
    FULL_FREE_BINS = 5
    SWA_FREE_BINS = 6
    FULL_EXCESS = 7
    SWA_EXCESS = 8
    SHARED_SLOT = 9
    PEER_FAULT = 10
    ORPHAN = 11
    STALE = 12
    PAGE = 13


AMOUNTS = (Kind.FULL_EXCESS, Kind.SWA_EXCESS)
"""Kinds whose one item is a computed amount, not a position in an index space."""

CHECK_DETAILS: dict[Name, tuple[str, ...]] = {
    Name.SENTINEL: ("sentinel entry (the mapping's last) is not -1",),
    Name.PAD: (
        "full free list holds padding unit 0",
        "SWA free list holds padding unit 0",
        "full tokens of padding page 0 have an SWA peer",
        "full tokens map into SWA padding page 0",
    ),
    Name.NODUP: (
        "full free-list units listed twice or out of range (-1 stands for negative entries)",
        "SWA free-list units listed twice or out of range (-1 stands for negative entries)",
    ),
    Name.CONSERVE: (
        "full units free + in use exceed the pool by",
        "SWA units free + in use exceed the pool by",
        "full_available_size() exceeds size_full by",
        "swa_available_size() exceeds size_swa by",
        "full_available_size() differs from the free full units x page_size by",
        "swa_available_size() differs from the free SWA units x page_size by",
    ),
    Name.SWA_LE_FULL: (
        "SWA slots are peers of two or more full tokens",
        "full tokens map to a free or non-existent SWA slot",
        "SWA units are neither free nor referenced (orphaned)",
    ),
    Name.AVAIL: ("available_size() is not min(full_available_size(), swa_available_size()); it returned",),
    Name.STALE: ("tokens of free full units still map to an SWA slot",),
    Name.PAGE: ("full tokens break their page's SWA pairing (another SWA page or offset)",),
}
"""Per model-free probe, what each check's items are, by tag: the phrase a report prints."""


@dataclass(frozen=True)
class Geometry:
    page_size: int
    full_units: int
    swa_units: int

    @property
    def entries(self) -> int:
        """Mapping entries before the sentinel: every token of full units 0..full_units."""
        return (self.full_units + 1) * self.page_size

    @property
    def swa_slots(self) -> int:
        """One past the largest SWA slot (unit 0, the padding unit, included)."""
        return (self.swa_units + 1) * self.page_size

    def span(self, kind: Kind) -> tuple[int, int]:
        """(first item, number of items) of a kind's index space."""
        ps, entries = self.page_size, self.entries
        return {
            Kind.SENTINEL: (entries, 1),
            Kind.FULL_FREE_PAD: (0, 1),
            Kind.SWA_FREE_PAD: (0, 1),
            Kind.PAD_ROW: (0, ps),
            Kind.PAD_PAGE_PEER: (0, entries),
            Kind.FULL_FREE_BINS: (-1, self.full_units + 3),
            Kind.SWA_FREE_BINS: (-1, self.swa_units + 3),
            Kind.FULL_EXCESS: (0, 1),
            Kind.SWA_EXCESS: (0, 1),
            Kind.SHARED_SLOT: (1, self.swa_slots - 1),
            Kind.PEER_FAULT: (0, entries),
            Kind.ORPHAN: (1, self.swa_units),
            Kind.STALE: (0, entries),
            Kind.PAGE: (0, entries),
        }[kind]


@dataclass(frozen=True)
class Check:
    kind: Kind
    tag: int


@dataclass(frozen=True, eq=False)
class Plan:
    """The checks of each selected probe, in order, for one pool geometry. Plans come from
    `plan` (cached), so identity is equality: caches keyed on a plan hash it cheaply."""

    geometry: Geometry
    names: tuple[Name, ...]
    checks: tuple[tuple[Check, ...], ...]
    """checks[i]: the device checks of names[i], in the order their items are reported."""
    max_indices: int
    in_free_group: bool


@functools.lru_cache(maxsize=512)  # the state machines draw hundreds of small pool shapes
def plan(
    page_size: int, size_full: int, size_swa: int, names: tuple[Name, ...], max_indices: int, in_free_group: bool
) -> Plan:
    geometry = Geometry(page_size, size_full // page_size, size_swa // page_size)
    paged = page_size > 1
    by_probe = {
        Name.SENTINEL: [Kind.SENTINEL],
        Name.PAD: [Kind.FULL_FREE_PAD, Kind.SWA_FREE_PAD, Kind.PAD_ROW] + [Kind.PAD_PAGE_PEER] * paged,
        Name.NODUP: [Kind.FULL_FREE_BINS, Kind.SWA_FREE_BINS],
        Name.CONSERVE: list(AMOUNTS),
        Name.SWA_LE_FULL: [Kind.SHARED_SLOT, Kind.PEER_FAULT] + [Kind.ORPHAN] * (not in_free_group),
        Name.AVAIL: [],
        Name.STALE: [Kind.STALE],
        Name.PAGE: [Kind.PAGE] * paged,
    }
    checks = tuple(tuple(Check(kind, tag) for tag, kind in enumerate(by_probe[name])) for name in names)
    return Plan(geometry, names, checks, max_indices, in_free_group)


# ------------------------------------------------------------ host findings
def host_findings(
    names: Sequence[Name],
    geometry: Geometry,
    sizes: tuple[int, int, int, int, int, int, int],
) -> dict[int, list[int]]:
    """Codes of the checks that host-known sizes fail, by row: {row: [code, ...]}.

    sizes: (size_full, size_swa, full_available, swa_available, available, full free units,
    SWA free units).
    """
    size_full, size_swa, full_available, swa_available, available, full_free, swa_free = sizes
    ps = geometry.page_size
    if (
        full_available <= size_full
        and swa_available <= size_swa
        and full_available == full_free * ps
        and swa_available == swa_free * ps
        and available == min(full_available, swa_available)
    ):
        return {}  # every check below passes: the usual case, kept cheap
    found: dict[int, list[int]] = {}
    for row, name in enumerate(names):
        if name == Name.CONSERVE:
            codes = [
                encode(tag, abs(amount))
                for tag, amount, wrong in (
                    (2, full_available - size_full, full_available > size_full),
                    (3, swa_available - size_swa, swa_available > size_swa),
                    (4, full_available - full_free * ps, full_available != full_free * ps),
                    (5, swa_available - swa_free * ps, swa_available != swa_free * ps),
                )
                if wrong
            ]
        elif name == Name.AVAIL:
            codes = [] if available == min(full_available, swa_available) else [encode(0, available)]
        else:
            continue
        if codes:
            found[row] = codes
    return found


def put_findings(packed: Tensor, findings: dict[int, list[int]]) -> Tensor:
    """The packed rows with host findings in front: count + len(findings), the findings' codes,
    then the device items that still fit. Codes go in with fill_ (a kernel argument), never
    through a host tensor, so that a captured CUDA graph holds no host addresses."""
    width = packed.shape[1] - 1
    out = packed.clone()
    for row, codes in findings.items():
        shown = min(len(codes), width)
        out[row, :1].add_(len(codes))
        for column, code in enumerate(codes[:shown], start=1):
            out[row, column : column + 1].fill_(code)
        out[row, 1 + shown :].copy_(packed[row, 1 : 1 + width - shown])
    return out
