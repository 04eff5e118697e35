"""Divergence detector: scans the live requests' token rows against the full-to-SWA mapping.

For every live token (position p < seq_len of a request in the batch) it looks up the SWA slot
paired with the token's full index and sorts the token into the counts of `DivergenceCounts`.
A token "holds" an SWA slot when the mapping gives a value > 0; 0 (evicted or never given),
the sentinel -1 and any other negative value all mean "no slot".

Everything runs on the tensors' device with no host synchronisation, so that a serving process
can call it on its hot path and read the counts back later. To stay safe without reading values
back, out-of-range data never faults: a full index outside the mapping counts as "no slot", a
request whose row is outside `req_to_token` scans nothing, and a seq_len beyond the row's length
scans the whole row.

Two implementations give identical results: a vectorised torch expression (any device) and a
fused Triton kernel (CUDA) that reads each live `req_to_token` entry exactly once.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from types import ModuleType

import torch
from torch import Tensor

from allocator.errors import IntegerError
from allocator.validation import check_int
from canary.backend import Impl, choose_backend

_INDEX_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1


class DivergenceInputError(ValueError):
    """The detector was given tensors or parameters it cannot scan (raised before any work)."""


class DivergenceIntegerError(IntegerError, DivergenceInputError):
    """A window, page size or slot count given to the detector is not an int >= 1."""


@dataclass(frozen=True)
class DivergenceCounts:
    """Per-request counts, each a [B] int64 tensor on the scanned device (never read back here)."""

    live: Tensor
    """Live tokens per request: a snapshot of seq_lens."""
    window_missing: Tensor
    """Tokens at positions >= max(0, seq_len - window) with no SWA slot (WINDOW, FATAL)."""
    leaked: Tensor
    """Tokens before the evict boundary that still hold an SWA slot (LEAK)."""
    evicted: Tensor
    """Tokens before the evict boundary with no SWA slot (expected, informational)."""
    non_identity: Tensor
    """Tokens holding an SWA slot that differs from their full index."""
    shared: Tensor
    """Tokens whose SWA slot is also held by a different full token of the batch."""

    def totals(self) -> Tensor:
        """[6] int64 sums over the batch, in field order, on the device."""
        return torch.stack(astuple(self)).sum(dim=1)


def detect_divergence(
    req_to_token: Tensor,
    req_pool_indices: Tensor,
    seq_lens: Tensor,
    window: int,
    mapping: Tensor,
    *,
    page_size: int = 1,
    evict_floors: Tensor | None = None,
    swa_slots: int,
    impl: Impl = "auto",
) -> DivergenceCounts:
    """Count, per live request, how its tokens' SWA slots diverge from the sliding-window contract.

    req_to_token: [num_rows, max_context] int32/int64, full token index per position.
    req_pool_indices: [B] int64 rows of the live batch; seq_lens: [B] int64.
    window: the sliding window W (>= 1), the same for every request.
    mapping: the allocator's full_to_swa_index_mapping (int64, last entry the sentinel -1).
    page_size: the allocator's page size; the default evict boundary is
        floor(max(0, seq_len - window) / page_size) * page_size.
    evict_floors: [B] int64 evict boundaries to use instead of the default ones.
    swa_slots: size of the SWA index space (size_swa + page_size); slots outside [1, swa_slots)
        still count as held but cannot be compared for sharing.
    impl: "torch", "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), or "auto"
        (triton on CUDA when it imports, torch otherwise).

    Shared slots are judged by distinct full indices, so requests that share a prefix (the
    same full tokens in several rows) do not count as sharing.
    """
    _check_inputs(req_to_token, req_pool_indices, seq_lens, window, mapping, page_size, evict_floors, swa_slots)
    kernels = _resolve_kernels(impl, req_to_token.device, mapping.numel())
    live = seq_lens.clone()
    if kernels is None:
        window_missing, leaked, evicted, non_identity, shared = _count_with_torch(
            req_to_token, req_pool_indices, seq_lens, window, mapping, page_size, evict_floors, swa_slots
        )
    else:
        window_missing, leaked, evicted, non_identity, shared = kernels.count_divergence(
            req_to_token, req_pool_indices, seq_lens, window, mapping, page_size, evict_floors, swa_slots
        )
    return DivergenceCounts(live, window_missing, leaked, evicted, non_identity, shared)


def _check_inputs(
    req_to_token: Tensor,
    req_pool_indices: Tensor,
    seq_lens: Tensor,
    window: int,
    mapping: Tensor,
    page_size: int,
    evict_floors: Tensor | None,
    swa_slots: int,
) -> None:
    _check_tensor("req_to_token", req_to_token, _INDEX_DTYPES, ndim=2)
    _check_tensor("req_pool_indices", req_pool_indices, (torch.int64,), ndim=1)
    _check_tensor("seq_lens", seq_lens, (torch.int64,), ndim=1)
    _check_tensor("mapping", mapping, (torch.int64,), ndim=1)
    batch = req_pool_indices.shape[0]
    vectors = {"seq_lens": seq_lens}
    if evict_floors is not None:
        _check_tensor("evict_floors", evict_floors, (torch.int64,), ndim=1)
        vectors["evict_floors"] = evict_floors
    for name, vector in vectors.items():
        if vector.shape[0] != batch:
            raise DivergenceInputError(
                f"{name} has {vector.shape[0]} entries but req_pool_indices has {batch}"
            )
    if mapping.numel() == 0:
        raise DivergenceInputError("mapping is empty; it must at least hold the sentinel entry")
    for name, tensor in (("req_pool_indices", req_pool_indices), ("seq_lens", seq_lens), ("mapping", mapping),
                         *vectors.items()):
        if tensor.device != req_to_token.device:
            raise DivergenceInputError(
                f"{name} is on {tensor.device} but req_to_token is on {req_to_token.device}"
            )
    check_int("window", window, 1, DivergenceIntegerError)
    check_int("page_size", page_size, 1, DivergenceIntegerError)
    check_int("swa_slots", swa_slots, 1, DivergenceIntegerError)


def _check_tensor(name: str, value: object, dtypes: tuple[torch.dtype, ...], ndim: int) -> None:
    if not isinstance(value, torch.Tensor):
        raise DivergenceInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = " or ".join(str(dtype) for dtype in dtypes)
        raise DivergenceInputError(f"{name} must be {allowed}, got {value.dtype}")
    if value.dim() != ndim:
        raise DivergenceInputError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")


def _resolve_kernels(impl: str, device: torch.device, mapping_len: int) -> ModuleType | None:
    """The Triton kernel module when `impl` selects it, None for the torch implementation."""
    kernels = choose_backend(impl, device, __name__, DivergenceInputError)
    if kernels is not None and mapping_len > _INT32_MAX:
        # The kernel keeps full indices as int32 in its per-slot holder table.
        if impl == "auto":
            return None
        raise DivergenceInputError(f"impl='triton' handles mappings up to 2**31-1 entries, got {mapping_len}")
    return kernels


def _count_with_torch(
    req_to_token: Tensor,
    req_pool_indices: Tensor,
    seq_lens: Tensor,
    window: int,
    mapping: Tensor,
    page_size: int,
    evict_floors: Tensor | None,
    swa_slots: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_rows, max_context = req_to_token.shape
    device = req_to_token.device
    row_ok = (req_pool_indices >= 0) & (req_pool_indices < num_rows)
    scan_len = torch.where(row_ok, seq_lens.clamp(0, max_context), 0)
    window_start = (seq_lens - window).clamp_min(0)
    boundary = evict_floors if evict_floors is not None else window_start // page_size * page_size

    # Invalid rows read row 0, but scan_len 0 masks all of it out.
    full = req_to_token.index_select(0, torch.where(row_ok, req_pool_indices, 0)).long()
    positions = torch.arange(max_context, device=device)
    live = positions < scan_len[:, None]
    in_mapping = (full >= 0) & (full < mapping.numel())
    slot = torch.where(live & in_mapping, mapping[full.clamp(0, mapping.numel() - 1)], 0)
    holds = slot > 0
    no_slot = live & ~holds
    before_boundary = positions < boundary[:, None]

    window_missing = (no_slot & (positions >= window_start[:, None])).sum(dim=1)
    leaked = (holds & before_boundary).sum(dim=1)
    evicted = (no_slot & before_boundary).sum(dim=1)
    non_identity = (holds & (slot != full)).sum(dim=1)
    shared = _count_shared_with_torch(full, slot, holds, swa_slots)
    return window_missing, leaked, evicted, non_identity, shared


def _count_shared_with_torch(full: Tensor, slot: Tensor, holds: Tensor, swa_slots: int) -> Tensor:
    """Tokens whose slot has >= 2 distinct full holders: the slot's smallest and largest differ.

    Min and max do not depend on reduction order, so the result is deterministic on any device.
    """
    tracked = holds & (slot < swa_slots)
    # Untracked tokens land in one spare bin whose (max=-1, min=int64 max) never looks shared.
    bins = torch.where(tracked, slot, swa_slots).flatten()
    int64_max = torch.iinfo(torch.int64).max
    largest = torch.full((swa_slots + 1,), -1, dtype=torch.int64, device=full.device).scatter_reduce(
        0, bins, torch.where(tracked, full, -1).flatten(), reduce="amax"
    )
    smallest = torch.full((swa_slots + 1,), int64_max, dtype=torch.int64, device=full.device).scatter_reduce(
        0, bins, torch.where(tracked, full, int64_max).flatten(), reduce="amin"
    )
    slot_is_shared = largest > smallest
    return (tracked & slot_is_shared[bins].view_as(slot)).sum(dim=1)
