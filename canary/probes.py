"""The invariant registry (SPEC §2) and the model-free probes that check an allocator's state.

Every invariant has a name and a severity; state machines, the runtime canary and reports all
use these names. Eight of them can be checked from the allocator's state alone: for those,
`run_probes` computes, on the allocator's device and with no host synchronisation, each
invariant's number of offending items and the first few of them, packed into one int64
tensor so that a single copy reads everything back.

How a probe reports. A probe is a set of *checks* (its sub-conditions), each marking
offending items in its own index space: full tokens, SWA slots, SWA units, free-list units,
or a computed amount. A packed row is [count, code_1 .. code_K], -1-padded; a code carries
the check's tag and the item, so that `ProbeResults.read` can say which check each item
breaks. The first K items are found with one cumulative sum over the row's flags and one
scatter (O(n), nothing of data-dependent shape).

What allocator state alone can show (units are slots at page size 1, pages otherwise):
  SENTINEL  mapping[-1] == -1.
  PAD       unit 0 is in no free list; no token of full page 0 has an SWA peer; no entry
            points into SWA page 0.
  NODUP     no free list holds a unit twice, or a value outside 1..num_units.
  CONSERVE  free units + units in use (SWA units referenced by the mapping, full units with
            a nonzero entry) <= capacity on each pool; available <= size; each pool's
            available size == its free units x page_size.
  SWA_LE_FULL  no SWA slot is the peer of two full tokens, no entry points at a free or
            non-existent SWA slot, and every SWA unit is free or referenced (skipped inside
            a free group, whose deferred units are neither).
  AVAIL     available_size() == min(full_available_size(), swa_available_size()).
  STALE     no token of a free full unit maps to an SWA slot.
  PAGE      (page size > 1) the nonzero entries of a full page map to one SWA page, each at
            its own offset.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor


class Severity(enum.Enum):
    FATAL = "FATAL"
    """Data corruption: a KV slot may be read or written by the wrong request."""
    GUARD = "GUARD"
    """Latent: harmless now, corruption after a later legal call."""


@dataclass(frozen=True)
class Invariant:
    name: str
    severity: Severity
    description: str
    model_free: bool
    """True when `run_probes` checks it from allocator state alone."""


INVARIANTS: dict[str, Invariant] = {
    invariant.name: invariant
    for invariant in (
        Invariant("SENTINEL", Severity.FATAL, "mapping[-1] == -1", True),
        Invariant("PAD", Severity.FATAL, "slot/page 0 is in no free list and is no live slot's SWA peer", True),
        Invariant(
            "NODUP",
            Severity.FATAL,
            "no free list holds a duplicate, no slot is both free and allocated, no allocation returns a slot twice",
            True,
        ),
        Invariant("CONSERVE", Severity.FATAL, "free + allocated == capacity on each pool; available <= size", True),
        Invariant(
            "SWA_LE_FULL",
            Severity.FATAL,
            "every allocated SWA slot is the peer of exactly one live full slot",
            True,
        ),
        Invariant("ATOMIC", Severity.FATAL, "a failed allocation changes nothing", False),
        Invariant("AVAIL", Severity.FATAL, "available_size() == min(full, swa)", True),
        Invariant("WINDOW", Severity.FATAL, "every token inside a live request's window has an SWA slot", False),
        Invariant("STALE", Severity.GUARD, "a free full slot, or an unallocated token of a live page, maps to 0", True),
        Invariant("PAGE", Severity.GUARD, "a full page's tokens map to one SWA page at the same offsets", True),
        Invariant("XLAT", Severity.GUARD, "translate(x) == mapping[x]", False),
        Invariant("LEAK", Severity.GUARD, "a token before the window (past the page margin) holds no SWA slot", False),
    )
}


@dataclass(frozen=True)
class Violation:
    invariant: str
    severity: Severity
    count: int
    """How many items break the invariant (may exceed len(indices))."""
    indices: list[int]
    """The first offending items (tokens, slots or units: `detail` says which)."""
    detail: str

    def explain(self) -> str:
        """One line, e.g. "FATAL SWA_LE_FULL: 2 SWA slots are peers of two or more full tokens: [5, 9]"."""
        line = f"{self.severity.value} {self.invariant}: {self.count} {self.detail}"
        if self.indices:
            line += f": {self.indices}"
            if len(self.indices) < self.count:
                line += f" (first {len(self.indices)} shown)"
        return line


class InvariantViolation(AssertionError):
    """Raised when a check finds violations; `.invariant` / `.severity` name the most severe
    (the first FATAL one, else the first)."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        if not violations:
            raise ValueError("InvariantViolation needs at least one violation")
        self.violations = list(violations)
        worst = next((v for v in self.violations if v.severity is Severity.FATAL), self.violations[0])
        self.invariant = worst.invariant
        self.severity = worst.severity
        super().__init__("\n".join(v.explain() for v in self.violations))


class ProbeInputError(ValueError):
    """The probes were given something they cannot read (raised before any device work)."""


# --------------------------------------------------------------------------- the view
@dataclass(frozen=True)
class AllocatorView:
    """Everything the probes read, gathered without host synchronisation."""

    mapping: Tensor
    """full_to_swa_index_mapping: int64, size_full + page_size + 1 entries, sentinel last."""
    full_free: Tensor
    """The full pool's free units (ready, then staged): pages, or slots at page size 1."""
    swa_free: Tensor
    page_size: int
    size_full: int
    size_swa: int
    full_available: int
    swa_available: int
    available: int
    in_free_group: bool

    def __post_init__(self) -> None:
        for name in ("page_size", "size_full", "size_swa", "full_available", "swa_available", "available"):
            value = getattr(self, name)
            if isinstance(value, (bool, Tensor)) or not isinstance(value, int):
                raise ProbeInputError(f"{name} must be a Python int, got {type(value).__name__}")
        if self.page_size < 1:
            raise ProbeInputError(f"page_size must be >= 1, got {self.page_size}")
        for name in ("size_full", "size_swa"):
            size = getattr(self, name)
            if size <= 0 or size % self.page_size:
                raise ProbeInputError(f"{name}={size} must be a positive multiple of page_size={self.page_size}")
        for name in ("mapping", "full_free", "swa_free"):
            tensor = getattr(self, name)
            if not isinstance(tensor, Tensor) or tensor.dtype != torch.int64 or tensor.dim() != 1:
                raise ProbeInputError(f"{name} must be a 1-D int64 tensor, got {_describe_value(tensor)}")
            if tensor.device != self.mapping.device:
                raise ProbeInputError(f"{name} is on {tensor.device} but the mapping is on {self.mapping.device}")
        expected = self.size_full + self.page_size + 1
        if self.mapping.numel() != expected:
            raise ProbeInputError(
                f"mapping has {self.mapping.numel()} entries; size_full + page_size + 1 = {expected}"
            )

    @classmethod
    def of(cls, allocator: object) -> "AllocatorView":
        """Read a SPEC §1 allocator, or an sglang-like one (free lists as free_pages +
        release_pages, free groups flagged by `is_not_in_free_group`)."""
        try:
            full_pool, swa_pool = allocator.full_attn_allocator, allocator.swa_attn_allocator
            return cls(
                mapping=allocator.full_to_swa_index_mapping,
                full_free=_free_units(full_pool),
                swa_free=_free_units(swa_pool),
                page_size=_as_int(allocator.page_size),
                size_full=_as_int(getattr(allocator, "size_full", None) or allocator.size),
                size_swa=_as_int(allocator.size_swa),
                full_available=_as_int(allocator.full_available_size()),
                swa_available=_as_int(allocator.swa_available_size()),
                available=_as_int(allocator.available_size()),
                in_free_group=_in_free_group(allocator, (full_pool, swa_pool)),
            )
        except AttributeError as error:
            raise ProbeInputError(f"{type(allocator).__name__} is not an SWA allocator: {error}") from error


def _free_units(pool: object) -> Tensor:
    get_all_free_pages = getattr(pool, "get_all_free_pages", None)
    if callable(get_all_free_pages):
        return get_all_free_pages()
    staged = getattr(pool, "release_pages", None)
    return pool.free_pages if staged is None else torch.cat((pool.free_pages, staged))


def _in_free_group(allocator: object, pools: Iterable[object]) -> bool:
    flag = getattr(allocator, "in_free_group", None)
    if flag is not None:
        return bool(flag() if callable(flag) else flag)
    # sglang keeps `is_not_in_free_group` on whichever object opened the group.
    return any(getattr(owner, "is_not_in_free_group", True) is False for owner in (allocator, *pools))


def _as_int(value: object) -> int:
    if isinstance(value, Tensor):
        raise ProbeInputError("sizes must be Python ints; reading a tensor back would synchronise")
    return operator.index(value)


def _describe_value(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


# ----------------------------------------------------------------- packed codes
# A code is (tag << _TAG_SHIFT) + item + 1: items are >= -1 (histogram bins report a
# negative value as -1), so codes are >= 0 and never collide with the -1 padding.
_TAG_SHIFT = 40


def _encode(tag: int, item: int) -> int:
    return (tag << _TAG_SHIFT) + item + 1


def _decode(code: int) -> tuple[int, int]:
    return code >> _TAG_SHIFT, (code & ((1 << _TAG_SHIFT) - 1)) - 1


@dataclass(frozen=True)
class _Evidence:
    """One check's candidates: flags[i] marks item `first + i`, or `items[i]` when given."""

    tag: int
    flags: Tensor
    first: int = 0
    items: Tensor | None = None

    def codes(self) -> Tensor:
        if self.items is not None:
            return self.items + _encode(self.tag, 0)
        start = _encode(self.tag, self.first)
        return torch.arange(start, start + self.flags.numel(), device=self.flags.device)


@dataclass(frozen=True)
class _Finding:
    """A check that failed on host-known values (sizes): no device work needed."""

    tag: int
    item: int


# ------------------------------------------------------------- shared tensors
class _State:
    """The view plus the derived tensors several probes share, each computed once."""

    def __init__(self, view: AllocatorView) -> None:
        self.view = view
        self.ps = view.page_size
        self.full_units = view.size_full // self.ps
        self.swa_units = view.size_swa // self.ps
        self.swa_slots = (self.swa_units + 1) * self.ps
        """One past the largest SWA slot (unit 0, the padding unit, included)."""
        self.device = view.mapping.device

    @cached_property
    def pages(self) -> Tensor:
        """The mapping without its sentinel, one row per full unit: [full_units + 1, ps]."""
        return self.view.mapping[:-1].view(self.full_units + 1, self.ps)

    @cached_property
    def holds(self) -> Tensor:
        return self.pages != 0

    @cached_property
    def ones(self) -> Tensor:
        longest = max(self.pages.numel(), self.view.full_free.numel(), self.view.swa_free.numel())
        return torch.ones(longest, dtype=torch.int32, device=self.device)

    def _histogram(self, values: Tensor, bins: int) -> Tensor:
        counts = torch.zeros(bins, dtype=torch.int32, device=self.device)
        return counts.index_add_(0, values, self.ones[: values.numel()])

    def _free_histogram(self, free: Tensor, units: int) -> Tensor:
        """Bin v + 1 counts the free-list entries equal to v, for v in -1..units + 1; bin 0
        takes every negative entry and the last bin every entry above `units`."""
        return self._histogram(free.clamp(-1, units + 1) + 1, units + 3)

    @cached_property
    def full_free_counts(self) -> Tensor:
        return self._free_histogram(self.view.full_free, self.full_units)

    @cached_property
    def swa_free_counts(self) -> Tensor:
        return self._free_histogram(self.view.swa_free, self.swa_units)

    @cached_property
    def full_unit_free(self) -> Tensor:
        """[full_units + 1]: whether each full unit (0 included) is in the free list."""
        return self.full_free_counts[1 : self.full_units + 2] > 0

    @cached_property
    def swa_unit_free(self) -> Tensor:
        """[swa_units + 2]: whether each SWA unit is in the free list; the last entry stands
        for every unit past the pool."""
        return self.swa_free_counts[1:] > 0

    @cached_property
    def swa_slot_refs(self) -> Tensor:
        """[swa_slots]: how many mapping entries point at each SWA slot. Entry 0 also counts
        the zero and negative entries, so only slots >= 1 mean anything."""
        slot = self.pages.reshape(-1).clamp(0, self.swa_slots)
        return self._histogram(slot, self.swa_slots + 1)[: self.swa_slots]

    @cached_property
    def swa_unit_refs(self) -> Tensor:
        """[swa_units + 1]: mapping entries pointing into each SWA unit (unit 0: see above)."""
        if self.ps == 1:
            return self.swa_slot_refs
        return self.swa_slot_refs.view(self.swa_units + 1, self.ps).sum(1)


# ------------------------------------------------------------------ the probes
ProbeOutput = tuple[list[_Finding], list[_Evidence]]


def _probe_sentinel(state: _State) -> ProbeOutput:
    mapping = state.view.mapping
    return [], [_Evidence(0, mapping[-1:] != -1, first=mapping.numel() - 1)]


def _probe_pad(state: _State) -> ProbeOutput:
    evidence = [
        _Evidence(0, state.full_free_counts[1:2] > 0),
        _Evidence(1, state.swa_free_counts[1:2] > 0),
        _Evidence(2, state.holds[0]),
    ]
    if state.ps > 1:
        peers = state.pages.reshape(-1)
        evidence.append(_Evidence(3, (peers > 0) & (peers < state.ps)))
    return [], evidence


def _probe_nodup(state: _State) -> ProbeOutput:
    def misplaced(counts: Tensor) -> Tensor:
        # Any entry in the out-of-range bins (negative, 0, past the pool) is wrong; in-range
        # units may appear once.
        allowed = torch.ones_like(counts)
        allowed[:2] = 0
        allowed[-1:] = 0
        return counts > allowed

    return [], [
        _Evidence(0, misplaced(state.full_free_counts), first=-1),
        _Evidence(1, misplaced(state.swa_free_counts), first=-1),
    ]


def _probe_conserve(state: _State) -> ProbeOutput:
    view, ps = state.view, state.ps
    full_free, swa_free = view.full_free.numel(), view.swa_free.numel()
    full_excess = state.holds[1:].any(1).sum().reshape(1) + (full_free - state.full_units)
    swa_excess = (state.swa_unit_refs[1:] > 0).sum().reshape(1) + (swa_free - state.swa_units)
    findings = [
        _Finding(tag, abs(amount))
        for tag, amount, wrong in (
            (2, view.full_available - view.size_full, view.full_available > view.size_full),
            (3, view.swa_available - view.size_swa, view.swa_available > view.size_swa),
            (4, view.full_available - full_free * ps, view.full_available != full_free * ps),
            (5, view.swa_available - swa_free * ps, view.swa_available != swa_free * ps),
        )
        if wrong
    ]
    return findings, [_Evidence(0, full_excess > 0, items=full_excess), _Evidence(1, swa_excess > 0, items=swa_excess)]


def _probe_swa_le_full(state: _State) -> ProbeOutput:
    peers = state.pages.reshape(-1)
    slot = peers.clamp(0, state.swa_slots)
    outside = (peers < 0) | (peers >= state.swa_slots)
    on_free_unit = state.swa_unit_free[slot // state.ps]
    evidence = [
        _Evidence(0, state.swa_slot_refs[1:] > 1, first=1),
        _Evidence(1, (peers != 0) & (outside | on_free_unit)),
    ]
    if not state.view.in_free_group:
        orphaned = (state.swa_unit_refs[1:] == 0) & ~state.swa_unit_free[1 : state.swa_units + 1]
        evidence.append(_Evidence(2, orphaned, first=1))
    return [], evidence


def _probe_avail(state: _State) -> ProbeOutput:
    view = state.view
    if view.available == min(view.full_available, view.swa_available):
        return [], []
    return [_Finding(0, view.available)], []


def _probe_stale(state: _State) -> ProbeOutput:
    return [], [_Evidence(0, (state.holds & state.full_unit_free[:, None]).reshape(-1))]


def _probe_page(state: _State) -> ProbeOutput:
    if state.ps == 1:
        return [], []
    offsets = torch.arange(state.ps, device=state.device)
    # A token paired correctly maps to (its SWA page) * ps + (its own offset), so
    # peer - offset is the same multiple of ps for every held token of the page.
    base = state.pages - offsets
    largest = torch.iinfo(torch.int64).max
    smallest = torch.where(state.holds, base, largest).amin(1, keepdim=True)
    broken = state.holds & ((base != smallest) | (smallest % state.ps != 0))
    return [], [_Evidence(0, broken.reshape(-1))]


@dataclass(frozen=True)
class _Probe:
    run: Callable[[_State], ProbeOutput]
    checks: tuple[str, ...]
    """What each check's items are, by tag: the noun phrase `Violation.explain` prints."""


_PROBES: dict[str, _Probe] = {
    "SENTINEL": _Probe(_probe_sentinel, ("sentinel entry (the mapping's last) is not -1",)),
    "PAD": _Probe(
        _probe_pad,
        (
            "full free list holds padding unit 0",
            "SWA free list holds padding unit 0",
            "full tokens of padding page 0 have an SWA peer",
            "full tokens map into SWA padding page 0",
        ),
    ),
    "NODUP": _Probe(
        _probe_nodup,
        (
            "full free-list units listed twice or out of range (-1 stands for negative entries)",
            "SWA free-list units listed twice or out of range (-1 stands for negative entries)",
        ),
    ),
    "CONSERVE": _Probe(
        _probe_conserve,
        (
            "full units free + in use exceed the pool by",
            "SWA units free + in use exceed the pool by",
            "full_available_size() exceeds size_full by",
            "swa_available_size() exceeds size_swa by",
            "full_available_size() differs from the free full units x page_size by",
            "swa_available_size() differs from the free SWA units x page_size by",
        ),
    ),
    "SWA_LE_FULL": _Probe(
        _probe_swa_le_full,
        (
            "SWA slots are peers of two or more full tokens",
            "full tokens map to a free or non-existent SWA slot",
            "SWA units are neither free nor referenced (orphaned)",
        ),
    ),
    "AVAIL": _Probe(
        _probe_avail, ("available_size() is not min(full_available_size(), swa_available_size()); it returned",)
    ),
    "STALE": _Probe(_probe_stale, ("tokens of free full units still map to an SWA slot",)),
    "PAGE": _Probe(_probe_page, ("full tokens break their page's SWA pairing (another SWA page or offset)",)),
}
assert set(_PROBES) == {name for name, invariant in INVARIANTS.items() if invariant.model_free}


# ------------------------------------------------------------------- running
@dataclass(frozen=True)
class ProbeResults:
    """The packed results of `run_probes`: row i belongs to names[i] and holds
    [count, code_1 .. code_K] (-1-padded); the tensor stays on the device until `read`."""

    names: tuple[str, ...]
    packed: Tensor

    @property
    def max_indices(self) -> int:
        return self.packed.shape[1] - 1

    def __getitem__(self, name: str) -> Tensor:
        """The packed row of one probe (a view, still on the device)."""
        try:
            return self.packed[self.names.index(name)]
        except ValueError:
            raise KeyError(f"no probe {name!r} in these results; they hold {list(self.names)}") from None

    @classmethod
    def from_packed(cls, names: Sequence[str], packed: Tensor) -> "ProbeResults":
        """Results around a packed tensor copied elsewhere (e.g. into pinned host memory)."""
        names = tuple(names)
        if not isinstance(packed, Tensor) or packed.dtype != torch.int64 or packed.dim() != 2:
            raise ProbeInputError(f"packed must be a 2-D int64 tensor, got {_describe_value(packed)}")
        if packed.shape[0] != len(names) or packed.shape[1] < 1:
            raise ProbeInputError(f"packed has shape {tuple(packed.shape)} for {len(names)} probes")
        _select(names)
        return cls(names, packed)

    def read(self) -> list[Violation]:
        """Copy the results to the host (the one synchronisation) and decode the violations."""
        rows = self.packed.cpu().tolist()
        return [
            violation
            for name, row in zip(self.names, rows)
            if (violation := _decode_row(name, row)) is not None
        ]


def run_probes(view: AllocatorView, names: Iterable[str] | None = None, max_indices: int = 8) -> ProbeResults:
    """Run the model-free probes among `names` (default: all of them) on the view's device.

    Names of model-based invariants are accepted and skipped. Nothing is read back: the
    result's `packed` tensor is filled by device work queued here.
    """
    if not isinstance(view, AllocatorView):
        raise ProbeInputError(f"run_probes takes an AllocatorView, got {type(view).__name__}")
    if isinstance(max_indices, bool) or not isinstance(max_indices, int) or max_indices < 0:
        raise ProbeInputError(f"max_indices must be an int >= 0, got {max_indices!r}")
    selected = _select(INVARIANTS if names is None else names)
    state = _State(view)
    width = max_indices + 1
    # One spare entry past the last row: a row's overflow column is the next row's count
    # column (or this spare), and the counts are written last, over it.
    buffer = torch.full((len(selected) * width + 1,), -1, dtype=torch.int64, device=state.device)
    counts = []
    for row, name in enumerate(selected):
        findings, evidence = _PROBES[name].run(state)
        counts.append(_collect(buffer[row * width : (row + 1) * width + 1], findings, evidence, max_indices))
    packed = buffer[: len(selected) * width].view(len(selected), width)
    if selected:
        zero = torch.zeros((), dtype=torch.int64, device=state.device)
        packed[:, 0] = torch.stack([count if isinstance(count, Tensor) else zero + count for count in counts])
    return ProbeResults(selected, packed)


def _select(names: Iterable[str]) -> tuple[str, ...]:
    """The model-free names among `names`, each once, in the order given."""
    if isinstance(names, str):
        names = (names,)
    selected: list[str] = []
    for name in names:
        if name not in INVARIANTS:
            raise ProbeInputError(f"unknown invariant {name!r}; known: {', '.join(INVARIANTS)}")
        if INVARIANTS[name].model_free and name not in selected:
            selected.append(name)
    return tuple(selected)


def _collect(row: Tensor, findings: list[_Finding], evidence: list[_Evidence], max_indices: int) -> Tensor | int:
    """Fill one packed row (plus its overflow column) and return the count, not yet written.

    Host-known findings take the first columns; each flagged item then goes to column
    (findings + its rank among the flagged items), or to the overflow column past
    max_indices. Unflagged items go to the overflow column too.
    """
    for column, finding in enumerate(findings[:max_indices], start=1):
        row[column] = _encode(finding.tag, finding.item)
    evidence = [item for item in evidence if item.flags.numel()]
    if not evidence:
        return len(findings)
    if len(evidence) == 1:
        flags, codes = evidence[0].flags, evidence[0].codes()
    else:
        flags = torch.cat([item.flags for item in evidence])
        codes = torch.cat([item.codes() for item in evidence])
    rank = flags.cumsum(0)
    if findings:
        rank = rank + len(findings)
    overflow = max_indices + 1
    row.scatter_(0, torch.where(flags, rank, overflow).clamp_(max=overflow), codes)
    return rank[-1]


def _decode_row(name: str, row: list[int]) -> Violation | None:
    count, codes = row[0], row[1:]
    if count <= 0:
        return None
    checks = _PROBES[name].checks
    tags, items = [], []
    for code in codes[:count]:
        if code < 0:
            break
        tag, item = _decode(code)
        if tag >= len(checks):
            raise ProbeInputError(f"packed row of {name} holds code {code}, which names no check")
        tags.append(tag)
        items.append(item)
    return Violation(name, INVARIANTS[name].severity, count, items, _detail(checks, tags))


def _detail(checks: tuple[str, ...], tags: list[int]) -> str:
    """The shown items' check, or each check with how many of the shown items break it."""
    if len(checks) == 1:
        return checks[0]
    if not tags:
        return "items break one of: " + "; ".join(checks)
    groups: list[list[int]] = []
    for tag in tags:
        if groups and groups[-1][0] == tag:
            groups[-1][1] += 1
        else:
            groups.append([tag, 1])
    if len(groups) == 1:
        return checks[tags[0]]
    return ", then ".join(f"{checks[tag]} ({shown})" for tag, shown in groups)
