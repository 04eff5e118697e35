"""One canary check as one device tensor: the model-free probes and the divergence detector's
counts packed together, so that a single copy reads a whole check back, and its decoding.

Layout: int64 [P + 6, max_indices + 1], P = the number of probes run.
  rows 0 .. P-1   `run_probes`' packed rows, unchanged.
  rows P .. P+5   one per `DivergenceCounts` field, in field order: [the count summed over
                  the batch, the req_to_token rows of the first max_indices requests whose
                  count is nonzero], -1-padded. All six rows are -1 when the detector did not
                  run (no batch, or no window).

Three detector counts are invariant violations (WINDOW, LEAK, and SWA_LE_FULL for shared
slots); the others (live, evicted, non_identity) are read back as totals only.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Iterable, Sequence

import torch
from torch import Tensor

from canary.divergence import DivergenceCounts, detect_divergence
from canary.invariants import INVARIANTS, Name, Violation
from canary.probes import AllocatorView, ProbeResults, run_probes

DIVERGENCE_KINDS: tuple[str, ...] = tuple(field.name for field in fields(DivergenceCounts))

DIVERGENCE_INVARIANTS: dict[str, tuple[Name, str]] = {
    "window_missing": (Name.WINDOW, "in-window tokens have no SWA slot, in requests (req_to_token rows)"),
    "leaked": (Name.LEAK, "tokens before the evict boundary still hold an SWA slot, in requests (req_to_token rows)"),
    "shared": (
        Name.SWA_LE_FULL, "live tokens share their SWA slot with another full token, in requests (req_to_token rows)"
    ),
}
"""Detector count -> (the invariant it breaks, what `Violation.explain` says is counted)."""


class SweepInputError(ValueError):
    """A check was given a batch or an output buffer it cannot use (raised before device work)."""


@dataclass(frozen=True)
class Batch:
    """The live requests of one scheduler step, as the divergence detector reads them."""

    req_to_token: Tensor
    req_pool_indices: Tensor
    seq_lens: Tensor
    evict_floors: Tensor | None = None

    @classmethod
    def of(
        cls,
        req_to_token: Tensor | None,
        req_pool_indices: Tensor | None,
        seq_lens: Tensor | None,
        evict_floors: Tensor | None = None,
    ) -> "Batch | None":
        """The batch, or None when no batch is given; half a batch is an error."""
        given = {"req_to_token": req_to_token, "req_pool_indices": req_pool_indices, "seq_lens": seq_lens}
        if all(value is None for value in given.values()):
            if evict_floors is not None:
                raise SweepInputError("evict_floors was given without a batch")
            return None
        missing = [name for name, value in given.items() if value is None]
        if req_to_token is None or req_pool_indices is None or seq_lens is None:
            raise SweepInputError(f"a batch needs req_to_token, req_pool_indices and seq_lens; missing {missing}")
        return cls(req_to_token, req_pool_indices, seq_lens, evict_floors)

    @property
    def size(self) -> int:
        return self.req_pool_indices.shape[0]


@dataclass(frozen=True)
class SweepResult:
    """A decoded check: what the probes and the detector found, and the detector's totals."""

    probe_violations: list[Violation]
    divergence_violations: list[Violation]
    divergence: dict[str, int] | None
    """Each `DIVERGENCE_KINDS` count summed over the batch; None when the detector did not run."""

    def sourced(self) -> list[tuple[str, Violation]]:
        """Every violation with where it comes from: "probe" or "divergence"."""
        return [("probe", v) for v in self.probe_violations] + [("divergence", v) for v in self.divergence_violations]

    @property
    def violations(self) -> list[Violation]:
        return self.probe_violations + self.divergence_violations


@dataclass(frozen=True)
class PackedSweep:
    """The packed check; `packed` stays on its device until `read`."""

    names: tuple[Name, ...]
    """The probes of the first rows, in order."""
    packed: Tensor

    def read(self) -> SweepResult:
        """Copy to the host (the one synchronisation) and decode."""
        return read_sweep(self.names, self.packed.cpu())


def sweep_rows(probe_count: int) -> int:
    return probe_count + len(DIVERGENCE_KINDS)


def sweep(
    view: AllocatorView,
    batch: Batch | None,
    window: int | None,
    *,
    page_size: int | None = None,
    probes: Iterable[str] | None = None,
    max_indices: int = 8,
    out: Tensor | None = None,
) -> PackedSweep:
    """Run the probes, and the detector when a batch and a window are given, on the view's
    device with no host synchronisation. `out` (preallocated, right shape) receives the
    result, so that the call allocates nothing of data-dependent shape and can be captured in
    a CUDA graph. `page_size` sets the detector's default evict boundary (default: the view's)."""
    results = run_probes(view, probes, max_indices)
    count = len(results.names)
    shape = (sweep_rows(count), max_indices + 1)
    if out is None:
        out = torch.empty(shape, dtype=torch.int64, device=view.mapping.device)
    elif out.dtype != torch.int64 or tuple(out.shape) != shape or out.device != view.mapping.device:
        raise SweepInputError(
            f"out must be an int64 tensor of shape {shape} on {view.mapping.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    out[:count].copy_(results.packed)
    if batch is None or window is None:
        out[count:].fill_(-1)
    else:
        out[count:].copy_(_divergence_rows(view, batch, window, page_size or view.page_size, max_indices))
    return PackedSweep(results.names, out)


def _divergence_rows(view: AllocatorView, batch: Batch, window: int, page_size: int, max_indices: int) -> Tensor:
    device = view.mapping.device
    kinds = len(DIVERGENCE_KINDS)
    if batch.size == 0:
        rows = torch.full((kinds, max_indices + 1), -1, dtype=torch.int64, device=device)
        rows[:, 0].fill_(0)  # a kernel; assigning a Python number would copy it from the host
        return rows
    counts = detect_divergence(
        batch.req_to_token,
        batch.req_pool_indices,
        batch.seq_lens,
        window,
        view.mapping,
        page_size=page_size,
        evict_floors=batch.evict_floors,
        swa_slots=view.size_swa + view.page_size,
    )
    per_request = torch.stack(astuple(counts))  # [kinds, B]
    totals = per_request.sum(dim=1, keepdim=True)
    if max_indices == 0:
        return totals
    # The k-th request with a nonzero count is where the running number of them reaches k.
    ranks = (per_request > 0).to(torch.int32).cumsum(dim=1)
    wanted = torch.arange(1, max_indices + 1, dtype=torch.int32, device=device).expand(kinds, max_indices)
    positions = torch.searchsorted(ranks, wanted.contiguous()).clamp_(max=batch.size - 1)
    shown = torch.arange(max_indices, device=device) < ranks[:, -1:]
    first = torch.where(shown, batch.req_pool_indices[positions], -1)
    return torch.cat((totals, first), dim=1)


def read_sweep(names: Sequence[str], host: Tensor) -> SweepResult:
    """Decode a packed check already on the host."""
    names = tuple(names)
    count = len(names)
    if not isinstance(host, Tensor) or host.dim() != 2 or host.shape[0] != sweep_rows(count):
        raise SweepInputError(f"a packed check of {count} probes has {sweep_rows(count)} rows")
    probe_violations = ProbeResults.from_packed(names, host[:count]).read()
    rows = host[count:].tolist()
    if rows[0][0] < 0:
        return SweepResult(probe_violations, [], None)
    totals = {kind: row[0] for kind, row in zip(DIVERGENCE_KINDS, rows)}
    divergence_violations = []
    for kind, row in zip(DIVERGENCE_KINDS, rows):
        if kind not in DIVERGENCE_INVARIANTS or row[0] <= 0:
            continue
        invariant, detail = DIVERGENCE_INVARIANTS[kind]
        shown = [item for item in row[1:] if item >= 0]
        divergence_violations.append(Violation(invariant, INVARIANTS[invariant].severity, row[0], shown, detail))
    return SweepResult(probe_violations, divergence_violations, totals)
