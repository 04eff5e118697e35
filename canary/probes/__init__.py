"""The model-free probes that check an allocator's state against the registry's invariants.

Eight invariants of the registry (`canary.invariants`) can be checked from the allocator's state alone: for those,
`run_probes` computes, on the allocator's device and with no host synchronisation, each
invariant's number of offending items and the first few of them, packed into one int64
tensor so that a single copy reads everything back.

How a probe reports. A probe is a set of *checks* (its sub-conditions), each marking
offending items in its own index space: full tokens, SWA slots, SWA units, free-list units,
or a computed amount. A packed row is [count, code_1 .. code_K], -1-padded; a code carries
the check's tag and the item, so that `ProbeResults.read` can say which check each item
breaks. `canary.probes.plan` lists every check and its index space. Two implementations
pack identical rows: a short sequence of torch operations (`canary.probes.torch_backend`, any
device) and fused Triton kernels (`canary.probes.triton_backend`, CUDA); both are free of
data-dependent shapes.

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

import operator
from dataclasses import dataclass
from types import ModuleType
from typing import Iterable, Sequence, SupportsIndex

import torch
from torch import Tensor

from allocator.errors import IntegerError
from allocator.interface import Pool, SWAAllocator
from allocator.validation import check_int
from canary.backend import Impl, choose_backend
from canary.invariants import INVARIANTS, Name, Violation
from canary.probes import torch_backend as _probes_torch
from canary.probes.plan import CHECK_DETAILS, decode, host_findings, plan, put_findings


class ProbeInputError(ValueError):
    """The probes were given something they cannot read (raised before any device work)."""


class ProbeIntegerError(IntegerError, ProbeInputError):
    """A size or count given to the probes is not an int of at least its bound."""


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
    inapplicable: tuple[Name, ...] = ()
    """Model-free invariants the allocator's interface leaves nothing to check of (`of` says
    when); run_probes skips them."""

    def __post_init__(self) -> None:
        sizes = (self.page_size, self.size_full, self.size_swa, self.full_available, self.swa_available, self.available)
        if any(type(value) is not int for value in sizes):  # the probes run after every step: check fast
            for name in ("page_size", "size_full", "size_swa", "full_available", "swa_available", "available"):
                check_int(name, getattr(self, name), error=ProbeIntegerError)
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
    def of(cls, allocator: SWAAllocator) -> "AllocatorView":
        """Read a SPEC §1 allocator, or an sglang-like one of any release: free lists as
        free_pages + release_pages; a free group open while `is_not_in_free_group` is False
        (up to 0.5.18, whose `free_group` is a list at all times) or while `free_group` is not
        None (0.5.19 on); `available_size()` raising NotImplementedError (0.4.9.post6-0.5.x:
        AVAIL does not apply, min(full, swa) stands in); `mapping_layout == "padded"`
        (MappingLayout: SENTINEL does not apply)."""
        try:
            full_pool, swa_pool = allocator.full_attn_allocator, allocator.swa_attn_allocator
            page_size = _as_int(allocator.page_size)
            size_full = _as_int(getattr(allocator, "size_full", None) or allocator.size)
            full_available = _as_int(allocator.full_available_size())
            swa_available = _as_int(allocator.swa_available_size())
            available = _available(allocator)
            mapping, inapplicable = _token_entries(allocator.full_to_swa_index_mapping, size_full, page_size, allocator)
            return cls(
                mapping=mapping,
                full_free=_free_units(full_pool),
                swa_free=_free_units(swa_pool),
                page_size=page_size,
                size_full=size_full,
                size_swa=_as_int(allocator.size_swa),
                full_available=full_available,
                swa_available=swa_available,
                available=min(full_available, swa_available) if available is None else available,
                in_free_group=_in_free_group(allocator, (full_pool, swa_pool)),
                inapplicable=inapplicable + ((Name.AVAIL,) if available is None else ()),
            )
        except AttributeError as error:
            raise ProbeInputError(f"{type(allocator).__name__} is not an SWA allocator: {error}") from error


class MappingLayout:
    """How an allocator lays out full_to_swa_index_mapping (its `mapping_layout` attribute).

    SENTINEL (SPEC, the default): size_full + page_size + 1 entries, token t's at t, -1 last.
    PADDED (sglang up to 0.5.7, page size 1 only): size_full + size_swa + 1 entries, token t's
    at t, then entries that belong to no token, and no sentinel (those releases never
    translate last_loc = -1). The view reads tokens 0..size_full and puts -1 after them, so
    the probes read one layout; SENTINEL does not apply.
    """

    SENTINEL = "sentinel"
    PADDED = "padded"


def _token_entries(
    mapping: Tensor, size_full: int, page_size: int, allocator: SWAAllocator
) -> tuple[Tensor, tuple[Name, ...]]:
    layout = getattr(allocator, "mapping_layout", MappingLayout.SENTINEL)
    if layout == MappingLayout.SENTINEL:
        return mapping, ()
    if layout != MappingLayout.PADDED:
        raise ProbeInputError(f"unknown mapping_layout {layout!r}; known: sentinel, padded")
    if not isinstance(mapping, Tensor) or mapping.dim() != 1 or mapping.numel() < size_full + page_size:
        raise ProbeInputError(
            f"a padded mapping needs at least {size_full + page_size} entries, got {_describe_value(mapping)}"
        )
    entries = mapping[: size_full + page_size]
    return torch.cat((entries, entries.new_full((1,), -1))), (Name.SENTINEL,)


def _available(allocator: SWAAllocator) -> int | None:
    """available_size(), or None where the allocator has it raise NotImplementedError."""
    try:
        return _as_int(allocator.available_size())
    except NotImplementedError:
        return None


def free_units(pool: Pool) -> Tensor:
    """A pool's free units, ready then staged, as the view reads them."""
    return _free_units(pool)


def sizes_and_group(allocator: SWAAllocator) -> tuple[int, int, int | None, bool]:
    """What the view reads besides the mapping and the free lists: full_available_size(),
    swa_available_size(), available_size() (None where it raises NotImplementedError), and
    whether a free group is open."""
    pools = (allocator.full_attn_allocator, allocator.swa_attn_allocator)
    full_available = _as_int(allocator.full_available_size())
    swa_available = _as_int(allocator.swa_available_size())
    return full_available, swa_available, _available(allocator), _in_free_group(allocator, pools)


def has_sentinel(allocator: SWAAllocator) -> bool:
    """Whether the allocator's mapping ends in the -1 sentinel (MappingLayout.SENTINEL)."""
    return getattr(allocator, "mapping_layout", MappingLayout.SENTINEL) == MappingLayout.SENTINEL


def _free_units(pool: Pool) -> Tensor:
    get_all_free_pages = getattr(pool, "get_all_free_pages", None)
    if callable(get_all_free_pages):
        return get_all_free_pages()
    # sglang's pools: ready units in free_pages, staged ones (need_sort) in release_pages.
    ready: Tensor | None = getattr(pool, "free_pages", None)
    if ready is None:
        raise AttributeError(f"{type(pool).__name__} has neither get_all_free_pages() nor free_pages")
    staged = getattr(pool, "release_pages", None)
    return ready if staged is None else torch.cat((ready, staged))


def _in_free_group(allocator: SWAAllocator, pools: Iterable[Pool]) -> bool:
    flag = getattr(allocator, "in_free_group", None)
    if flag is not None:
        return bool(flag() if callable(flag) else flag)
    # sglang keeps its group state on whichever object opened the group. Up to 0.5.18 the
    # flag `is_not_in_free_group` says it, and `free_group` is a list at all times (empty
    # outside a group); from 0.5.19 `free_group` is a list inside a group and None outside.
    return any(_owner_in_group(owner) for owner in (allocator, *pools))


def _owner_in_group(owner: object) -> bool:
    flag = getattr(owner, "is_not_in_free_group", None)
    if flag is not None:
        return flag is False
    return getattr(owner, "free_group", None) is not None


def _as_int(value: SupportsIndex | Tensor) -> int:
    if isinstance(value, Tensor):
        raise ProbeInputError("sizes must be Python ints; reading a tensor back would synchronise")
    return operator.index(value)


def _describe_value(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


# ------------------------------------------------------------------- running
@dataclass(frozen=True)
class ProbeResults:
    """The packed results of `run_probes`: row i belongs to names[i] and holds
    [count, code_1 .. code_K] (-1-padded); the tensor stays on the device until `read`."""

    names: tuple[Name, ...]
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
        if not isinstance(packed, Tensor) or packed.dtype != torch.int64 or packed.dim() != 2:
            raise ProbeInputError(f"packed must be a 2-D int64 tensor, got {_describe_value(packed)}")
        if packed.shape[0] != len(names) or packed.shape[1] < 1:
            raise ProbeInputError(f"packed has shape {tuple(packed.shape)} for {len(names)} probes")
        return cls(tuple(_name(name) for name in names), packed)

    def read(self) -> list[Violation]:
        """Copy the results to the host (the one synchronisation) and decode the violations."""
        rows = self.packed.cpu().tolist()
        return [
            violation
            for name, row in zip(self.names, rows)
            if (violation := _decode_row(name, row)) is not None
        ]


_MODEL_FREE = tuple(name for name, invariant in INVARIANTS.items() if invariant.model_free)


def run_probes(
    view: AllocatorView, names: Iterable[str] | None = None, max_indices: int = 8, *, impl: Impl = "auto"
) -> ProbeResults:
    """Run the model-free probes among `names` (default: all of them) on the view's device.

    Names of model-based invariants are accepted and skipped. Nothing is read back: the
    result's `packed` tensor is filled by device work queued here. impl: "torch", "triton"
    (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), or "auto" (triton on CUDA when
    it imports, torch otherwise); both pack identical results.
    """
    if not isinstance(view, AllocatorView):
        raise ProbeInputError(f"run_probes takes an AllocatorView, got {type(view).__name__}")
    check_int("max_indices", max_indices, 0, ProbeIntegerError)
    selected = _MODEL_FREE if names is None else select_probes(names)
    selected = tuple(name for name in selected if name not in view.inapplicable)
    device = view.mapping.device
    # The state machines call this after every step on CPU: the common case goes first.
    implementation = _probes_torch if impl == "auto" and device.type == "cpu" else _implementation(impl, device)
    if not selected:
        return ProbeResults((), torch.empty((0, max_indices + 1), dtype=torch.int64, device=device))
    probe_plan = plan(view.page_size, view.size_full, view.size_swa, selected, max_indices, view.in_free_group)
    packed = implementation.pack(view.mapping, view.full_free, view.swa_free, probe_plan)
    findings = host_findings(
        selected,
        probe_plan.geometry,
        (
            view.size_full,
            view.size_swa,
            view.full_available,
            view.swa_available,
            view.available,
            view.full_free.numel(),
            view.swa_free.numel(),
        ),
    )
    if findings:
        packed = put_findings(packed, findings)
    return ProbeResults(selected, packed)


def _implementation(impl: str, device: torch.device) -> ModuleType:
    """The module whose `pack` runs the probes: the Triton kernels or the torch expression."""
    return choose_backend(impl, device, __name__, ProbeInputError) or _probes_torch


def select_probes(names: Iterable[str]) -> tuple[Name, ...]:
    """The model-free names among `names`, each once, in the order given."""
    if isinstance(names, str):
        names = (names,)
    selected: list[Name] = []
    for name in map(_name, names):
        if INVARIANTS[name].model_free and name not in selected:
            selected.append(name)
    return tuple(selected)


def _name(name: str) -> Name:
    if name not in INVARIANTS:
        raise ProbeInputError(f"unknown invariant {name!r}; known: {', '.join(INVARIANTS)}")
    return Name(name)


def _decode_row(name: Name, row: list[int]) -> Violation | None:
    count, codes = row[0], row[1:]
    if count <= 0:
        return None
    checks = CHECK_DETAILS[name]
    tags, items = [], []
    for code in codes[:count]:
        if code < 0:
            break
        tag, item = decode(code)
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
