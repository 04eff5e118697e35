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
import functools
import operator
from dataclasses import dataclass, field
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
        Invariant(
            "CONTRACT",
            Severity.GUARD,
            "results, free-list order, sizes and mapping are exactly what SPEC §1 prescribes",
            False,
        ),
        Invariant(
            "DIFFERENTIAL",
            Severity.GUARD,
            "two allocators given the same calls return the same values and keep the same sizes, "
            "free units and mapping",
            False,
        ),
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
        release_pages, a free group open while `free_group` is a list, or, in older releases,
        while `is_not_in_free_group` is False)."""
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
    # sglang keeps its group state on whichever object opened the group: a `free_group` list
    # (None outside a group; 0.5.23), or `is_not_in_free_group` (older releases).
    owners = (allocator, *pools)
    return any(getattr(owner, "free_group", None) is not None for owner in owners) or any(
        getattr(owner, "is_not_in_free_group", True) is False for owner in owners
    )


def _as_int(value: object) -> int:
    if isinstance(value, Tensor):
        raise ProbeInputError("sizes must be Python ints; reading a tensor back would synchronise")
    return operator.index(value)


def _describe_value(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


# ----------------------------------------------------------------- packed codes
# A code is (tag << _TAG_SHIFT) + item + 1: items are >= -1 (free-list histograms report
# negative entries as -1), so codes are >= 0 and never collide with the -1 padding.
_TAG_SHIFT = 40


def _encode(tag: int, item: int) -> int:
    return (tag << _TAG_SHIFT) + item + 1


def _decode(code: int) -> tuple[int, int]:
    return code >> _TAG_SHIFT, (code & ((1 << _TAG_SHIFT) - 1)) - 1


@dataclass(frozen=True)
class _Flags:
    """One check's verdict over a run of items: flags[i] marks item `first + i`."""

    tag: int
    flags: Tensor
    first: int = 0


@dataclass(frozen=True)
class _Amounts:
    """Verdicts on a few computed amounts: flags[i] marks the item coded as codes[i]."""

    flags: Tensor
    codes: Tensor


@dataclass(frozen=True)
class _Finding:
    """A check that failed on host-known values (sizes): no device work needed."""

    tag: int
    item: int


@dataclass
class _Verdict:
    """What one probe found: item runs (collected for all probes at once), or host-known
    findings plus a few computed amounts (collected per probe)."""

    runs: list[_Flags] = field(default_factory=list)
    findings: list[_Finding] = field(default_factory=list)
    amounts: list[_Amounts] = field(default_factory=list)


@functools.lru_cache(maxsize=256)
def _constant(values: tuple[int, ...], device: torch.device) -> Tensor:
    """A small int64 tensor of layout constants, copied to the device once, without a sync.

    The layout depends only on the pool sizes and the probes chosen, so later calls reuse it.
    """
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


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
        """[full_units + 1, ps]: whether each full token has a nonzero entry."""
        return self.pages != 0

    @cached_property
    def peer_bins(self) -> Tensor:
        """int32, each entry's bin among the SWA slots: 0 for a negative entry, s + 1 for slot
        s (1 for "no peer"), swa_slots + 1 for an entry past the pool."""
        clamped = self.pages.reshape(-1).clamp(-1, self.swa_slots)
        # int32 (pools stay far below 2**31 slots) halves the bytes of every later pass.
        return torch.add(clamped, 1, out=torch.empty(clamped.shape, dtype=torch.int32, device=self.device))

    @cached_property
    def _one(self) -> Tensor:
        return torch.ones(1, dtype=torch.int32, device=self.device)

    def _histogram(self, bins: Tensor, size: int) -> Tensor:
        counts = torch.zeros(size, dtype=torch.int32, device=self.device)
        return counts.index_add_(0, bins, self._one.expand(bins.numel()))

    @cached_property
    def peer_bin_counts(self) -> Tensor:
        """[swa_slots + 2]: how many entries fall in each of `peer_bins`' bins (bin 1, "no
        peer", stays 0)."""
        # Most entries are 0: counting them all in bin 1 would serialise millions of atomic
        # adds on one counter, so each gets a bin of its own past the real ones instead.
        entries = self.peer_bins.numel()
        own_bins = torch.arange(self.swa_slots + 2, self.swa_slots + 2 + entries, dtype=torch.int32, device=self.device)
        bins = torch.where(self.holds.reshape(-1), self.peer_bins, own_bins)
        return self._histogram(bins, self.swa_slots + 2 + entries)[: self.swa_slots + 2]

    @cached_property
    def swa_unit_refs(self) -> Tensor:
        """[swa_units]: entries pointing into each SWA unit 1..swa_units."""
        slots = self.peer_bin_counts[self.ps + 1 : self.swa_slots + 1]
        return slots if self.ps == 1 else slots.view(self.swa_units, self.ps).sum(1)

    def _free_counts(self, free: Tensor, units: int) -> Tensor:
        """[units + 3]: bin v + 1 counts the free-list entries equal to v, for v in
        -1..units + 1; bin 0 takes every negative entry, the last every entry past the pool."""
        return self._histogram(free.clamp(-1, units + 1) + 1, units + 3)

    @cached_property
    def full_free_counts(self) -> Tensor:
        return self._free_counts(self.view.full_free, self.full_units)

    @cached_property
    def swa_free_counts(self) -> Tensor:
        return self._free_counts(self.view.swa_free, self.swa_units)

    @cached_property
    def full_unit_free(self) -> Tensor:
        """[full_units + 1]: whether each full unit (0 included) is in the free list."""
        return self.full_free_counts[1 : self.full_units + 2] > 0

    @cached_property
    def peer_faults(self) -> Tensor:
        """uint8 per entry: bit 0 when it points below or past the SWA pool or into a free SWA
        unit; bit 1 when it points into the SWA padding page (slots 1..ps-1). One gather
        through a per-bin table answers both for every entry."""
        table = torch.zeros(self.swa_slots + 2, dtype=torch.uint8, device=self.device)
        unit_free = self.swa_free_counts[1 : self.swa_units + 2] > 0
        table[1 : self.swa_slots + 1].view(self.swa_units + 1, self.ps).copy_(unit_free[:, None])
        # Slices and fill_, not table[i] = value, which would copy a host scalar on CUDA.
        table[1:2].fill_(0)  # slot 0 is "no peer"
        table[:1].fill_(1)
        table[-1:].fill_(1)
        if self.ps > 1:
            table[2 : self.ps + 1].bitwise_or_(2)
        return table.index_select(0, self.peer_bins)


# ------------------------------------------------------------------ the probes
def _probe_sentinel(state: _State) -> _Verdict:
    mapping = state.view.mapping
    return _Verdict(runs=[_Flags(0, mapping[-1:] != -1, first=mapping.numel() - 1)])


def _probe_pad(state: _State) -> _Verdict:
    runs = [
        _Flags(0, state.full_free_counts[1:2] > 0),
        _Flags(1, state.swa_free_counts[1:2] > 0),
        _Flags(2, state.holds[0]),
    ]
    if state.ps > 1:
        runs.append(_Flags(3, (state.peer_faults >> 1).view(torch.bool)))
    return _Verdict(runs=runs)


def _probe_nodup(state: _State) -> _Verdict:
    runs = []
    for tag, counts, units in ((0, state.full_free_counts, state.full_units), (1, state.swa_free_counts, state.swa_units)):
        # Bins: negative, 0, 1..units, past the pool. Out-of-range values may not appear at all.
        runs += [
            _Flags(tag, counts[:2] > 0, first=-1),
            _Flags(tag, counts[2 : units + 2] > 1, first=1),
            _Flags(tag, counts[units + 2 :] > 0, first=units + 1),
        ]
    return _Verdict(runs=runs)


def _probe_conserve(state: _State) -> _Verdict:
    view, ps = state.view, state.ps
    full_free, swa_free = view.full_free.numel(), view.swa_free.numel()
    held_units = state.holds[1:] if state.ps == 1 else state.holds[1:].any(1)
    amounts = []
    for tag, in_use, free, units in (
        (0, held_units.sum(), full_free, state.full_units),
        (1, (state.swa_unit_refs > 0).sum(), swa_free, state.swa_units),
    ):
        # Item: the excess in_use + free - units. Python scalars keep the layout constants fixed.
        in_use = in_use.reshape(1)
        amounts.append(_Amounts(in_use > units - free, in_use + _encode(tag, free - units)))
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
    return _Verdict(findings=findings, amounts=amounts)


def _probe_swa_le_full(state: _State) -> _Verdict:
    slot_refs = state.peer_bin_counts[2 : state.swa_slots + 1]
    runs = [
        _Flags(0, slot_refs > 1, first=1),
        _Flags(1, (state.peer_faults & 1).view(torch.bool)),
    ]
    if not state.view.in_free_group:
        orphaned = (state.swa_unit_refs + state.swa_free_counts[2 : state.swa_units + 2]) == 0
        runs.append(_Flags(2, orphaned, first=1))
    return _Verdict(runs=runs)


def _probe_avail(state: _State) -> _Verdict:
    view = state.view
    if view.available == min(view.full_available, view.swa_available):
        return _Verdict()
    return _Verdict(findings=[_Finding(0, view.available)])


def _probe_stale(state: _State) -> _Verdict:
    return _Verdict(runs=[_Flags(0, (state.holds & state.full_unit_free[:, None]).reshape(-1))])


def _probe_page(state: _State) -> _Verdict:
    if state.ps == 1:
        return _Verdict()
    offsets = torch.arange(state.ps, device=state.device)
    # A token paired correctly maps to (its SWA page) * ps + (its own offset), so
    # entry - offset is the same multiple of ps for every held token of the page.
    base = state.pages - offsets
    smallest = torch.where(state.holds, base, torch.iinfo(torch.int64).max).amin(1, keepdim=True)
    broken = state.holds & ((base != smallest) | (smallest % state.ps != 0))
    return _Verdict(runs=[_Flags(0, broken.reshape(-1))])


@dataclass(frozen=True)
class _Probe:
    run: Callable[[_State], _Verdict]
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
    verdicts = {name: _PROBES[name].run(state) for name in selected}
    rows = _collect_runs({name: verdict.runs for name, verdict in verdicts.items()}, max_indices, state.device)
    quiet = None
    for name, verdict in verdicts.items():
        if name in rows:
            continue
        if verdict.findings or verdict.amounts:
            rows[name] = _collect_amounts(verdict.findings, verdict.amounts, max_indices, state.device)
        else:
            quiet = _collect_amounts([], [], max_indices, state.device) if quiet is None else quiet
            rows[name] = quiet
    if not selected:
        return ProbeResults((), torch.empty((0, max_indices + 1), dtype=torch.int64, device=state.device))
    return ProbeResults(selected, torch.stack([rows[name] for name in selected]))


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


def _collect_runs(runs_by_probe: dict[str, list[_Flags]], max_indices: int, device: torch.device) -> dict[str, Tensor]:
    """The packed rows of every probe that reports item runs, collected all at once.

    All runs are laid end to end in one flag vector, one cumulative sum ranks the flagged
    items, and a binary search in that sum finds each probe's first `max_indices` items; a
    second search in the run starts turns positions back into items.
    """
    probes, flags, run_starts, run_offsets, bounds = [], [], [], [], []
    position = 0
    for name, runs in runs_by_probe.items():
        runs = [run for run in runs if run.flags.numel()]
        if not runs:
            continue
        probes.append(name)
        bounds.append(position)
        for run in runs:
            flags.append(run.flags.reshape(-1))
            run_starts.append(position)
            run_offsets.append(_encode(run.tag, run.first) - position)
            position += run.flags.numel()
    if not probes:
        return {}
    ranks = torch.cat(flags).cumsum(0, dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    # ranks_before[i]: flagged items before probe i's runs; the last entry counts them all.
    ranks_before = torch.cat([zero] + [ranks[start - 1 : start] for start in bounds[1:]] + [ranks[-1:]])
    counts = ranks_before[1:] - ranks_before[:-1]
    steps = torch.arange(1, max_indices + 1, dtype=torch.int32, device=device)
    positions = torch.searchsorted(ranks, ranks_before[:-1, None] + steps)
    # run_of is 1 + the index of the run holding each position; offsets are padded to match.
    run_of = torch.searchsorted(_constant(tuple(run_starts), device), positions, right=True)
    codes = positions + torch.take(_constant((0, *run_offsets), device), run_of)
    shown = steps <= counts[:, None]
    block = torch.cat((counts[:, None].long(), torch.where(shown, codes, -1)), dim=1)
    return dict(zip(probes, block))


def _collect_amounts(
    findings: list[_Finding], amounts: list[_Amounts], max_indices: int, device: torch.device
) -> Tensor:
    """The packed row of a probe with host-known findings and a few computed amounts.

    Findings take the first columns; each flagged amount goes to the next column by its rank,
    or to a spare column past the row (dropped) when the row is full or it is not flagged.
    """
    row = torch.full((max_indices + 2,), -1, dtype=torch.int64, device=device)
    for column, finding in enumerate(findings[:max_indices], start=1):
        row[column : column + 1].fill_(_encode(finding.tag, finding.item))
    if not amounts:
        row[:1].fill_(len(findings))
        return row[:-1]
    flags = torch.cat([amount.flags for amount in amounts]) if len(amounts) > 1 else amounts[0].flags
    codes = torch.cat([amount.codes for amount in amounts]) if len(amounts) > 1 else amounts[0].codes
    rank = flags.cumsum(0)
    if findings:
        rank = rank + len(findings)
    spare = max_indices + 1
    row.scatter_(0, torch.where(flags, rank, spare).clamp_(max=spare), codes)
    row[:1].copy_(rank[-1:])
    return row[:-1]


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
