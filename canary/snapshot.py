"""Snapshots of a checked allocator state, and their offline replay.

A snapshot holds everything one check read: the mapping, both free lists, the sizes and the
page size, the free-group flag, the detector's window and page size, and the batch (only the
req_to_token rows of its requests, not the whole table). `Snapshot.capture` copies these on
the device without a host synchronisation, so a monitor can keep the exact state it checked
until the check is read back; `save` moves them to the host (a synchronisation, paid only when
a violation is found) and writes them with torch.save, wrapped with a SHA-256 digest of the
saved bytes, so that a damaged or edited file is rejected instead of replayed as violations;
`load` checks the digest and reads them on the CPU with weights_only=True; `replay` runs the
same check again.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from allocator.errors import IntegerError
from allocator.validation import check_int
from canary.probes import AllocatorView, ProbeInputError
from canary.sweep import Batch, SweepResult, sweep

SNAPSHOT_FORMAT = "swa-canary-snapshot"
SNAPSHOT_VERSION = 2
"""2: the state inside a digest-checked wrapper (version 1 had no digest)."""
_WRAPPER_KEYS = {"format", "version", "sha256", "snapshot"}

_VIEW_TENSORS = ("mapping", "full_free", "swa_free")
_VIEW_INTS = ("page_size", "size_full", "size_swa", "full_available", "swa_available", "available")


class SnapshotError(ValueError):
    """A file that is not a readable canary snapshot."""


class SnapshotIntegerError(IntegerError, SnapshotError):
    """A count in a snapshot file is not an int."""


@dataclass(frozen=True)
class Snapshot:
    view: AllocatorView
    batch: Batch | None
    """The batch with req_to_token cut down to its requests' rows, in batch order;
    req_pool_indices keeps the original row numbers."""
    table_rows: int
    """Rows of the original req_to_token: a pool index outside them scanned nothing."""
    window: int | None
    page_size: int
    """The page size of the detector's evict boundary."""
    step: int
    monitor: str

    @classmethod
    def capture(
        cls, view: AllocatorView, batch: Batch | None, *, window: int | None, page_size: int, step: int, monitor: str
    ) -> "Snapshot":
        """Device copies of what a check reads, taken without a host synchronisation."""
        copied = replace(view, **{name: getattr(view, name).clone() for name in _VIEW_TENSORS})
        if batch is None:
            return cls(copied, None, 0, window, page_size, step, monitor)
        table = batch.req_to_token
        if table.shape[0] == 0:
            rows = table.new_zeros((batch.size, table.shape[1]))
        else:
            rows = table.index_select(
                0, torch.where(_valid_rows(batch.req_pool_indices, table.shape[0]), batch.req_pool_indices, 0)
            )
        floors = None if batch.evict_floors is None else batch.evict_floors.clone()
        cut = Batch(rows, batch.req_pool_indices.clone(), batch.seq_lens.clone(), floors)
        return cls(copied, cut, table.shape[0], window, page_size, step, monitor)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the snapshot (moving its tensors to the host first)."""
        path = Path(path)
        view = {name: getattr(self.view, name) for name in (*_VIEW_TENSORS, *_VIEW_INTS, "in_free_group")}
        body: dict[str, Any] = {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "monitor": self.monitor,
            "step": self.step,
            "window": self.window,
            "page_size": self.page_size,
            "allocator": {key: _to_host(value) for key, value in view.items()},
            "batch": None,
        }
        if self.batch is not None:
            body["batch"] = {key: _to_host(value) for key, value in asdict(self.batch).items()}
            body["batch"]["table_rows"] = self.table_rows
        saved = io.BytesIO()
        torch.save(body, saved)
        payload = saved.getvalue()
        wrapper = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION,
                   "sha256": hashlib.sha256(payload).hexdigest(), "snapshot": payload}
        torch.save(wrapper, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Snapshot":
        """Read a snapshot on the CPU; SnapshotError names what is wrong with a bad file (one
        that is no snapshot, of another version, or whose digest does not match its bytes)."""
        where = os.fspath(path)
        if not os.path.isfile(where):
            raise SnapshotError(f"no snapshot file {where!r}")
        wrapper = _mapping_with(_torch_load(path, where), _WRAPPER_KEYS, where)
        if wrapper["format"] != SNAPSHOT_FORMAT or wrapper["version"] != SNAPSHOT_VERSION:
            raise SnapshotError(f"{where}: format {wrapper['format']!r} version {wrapper['version']!r}, "
                                f"expected {SNAPSHOT_FORMAT!r} version {SNAPSHOT_VERSION}")
        payload = wrapper["snapshot"]
        if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != wrapper["sha256"]:
            raise SnapshotError(f"{where}: the digest does not match the saved state (the file was damaged or edited)")
        return cls._from_body(_torch_load(io.BytesIO(payload), where), where)

    @classmethod
    def _from_body(cls, body: object, where: str) -> "Snapshot":
        body = _mapping_with(
            body, {"format", "version", "monitor", "step", "window", "page_size", "allocator", "batch"}, where
        )
        if body["format"] != SNAPSHOT_FORMAT or body["version"] != SNAPSHOT_VERSION:
            raise SnapshotError(f"{where}: format {body['format']!r} version {body['version']!r}, "
                                f"expected {SNAPSHOT_FORMAT!r} version {SNAPSHOT_VERSION}")
        for key, types in (("monitor", (str,)), ("step", (int,)), ("window", (int, type(None))), ("page_size", (int,))):
            if isinstance(body[key], bool) or not isinstance(body[key], types):
                raise SnapshotError(f"{where}: {key} has the wrong type: {body[key]!r}")
        allocator = _mapping_with(
            body["allocator"], {*_VIEW_TENSORS, *_VIEW_INTS, "in_free_group"}, f"{where}: allocator"
        )
        if not isinstance(allocator["in_free_group"], bool):
            raise SnapshotError(f"{where}: allocator.in_free_group is not a bool")
        try:
            view = AllocatorView(**allocator)
        except ProbeInputError as error:
            raise SnapshotError(f"{where}: allocator state: {error}") from None
        if body["batch"] is None:
            return cls(view, None, 0, body["window"], body["page_size"], body["step"], body["monitor"])
        batch = _mapping_with(
            body["batch"],
            {"req_to_token", "req_pool_indices", "seq_lens", "evict_floors", "table_rows"},
            f"{where}: batch",
        )
        for key, ndim in (("req_to_token", 2), ("req_pool_indices", 1), ("seq_lens", 1), ("evict_floors", 1)):
            value = batch[key]
            if (value is not None or key != "evict_floors") and (not isinstance(value, Tensor) or value.dim() != ndim):
                raise SnapshotError(f"{where}: batch.{key} is not a {ndim}-D tensor")
        if batch["req_to_token"].shape[0] != batch["req_pool_indices"].shape[0]:
            raise SnapshotError(f"{where}: batch.req_to_token must hold one row per request")
        check_int(f"{where}: batch.table_rows", batch["table_rows"], 0, SnapshotIntegerError)
        cut = Batch(batch["req_to_token"], batch["req_pool_indices"], batch["seq_lens"], batch["evict_floors"])
        return cls(view, cut, batch["table_rows"], body["window"], body["page_size"], body["step"], body["monitor"])


def replay(snapshot: Snapshot, *, probes: Iterable[str] | None = None, max_indices: int = 8) -> SweepResult:
    """Run the check on the snapshot again (on the snapshot's device, the CPU once loaded).

    Divergence violations name the original req_to_token rows, as the monitor reported them.
    """
    batch = snapshot.batch
    if batch is not None:
        original = batch.req_pool_indices
        positions = torch.arange(batch.size, device=original.device)
        batch = replace(batch, req_pool_indices=torch.where(_valid_rows(original, snapshot.table_rows), positions, -1))
    result = sweep(
        snapshot.view, batch, snapshot.window, page_size=snapshot.page_size, probes=probes, max_indices=max_indices
    ).read()
    if batch is None:
        return result
    rows = original.tolist()
    renamed = [replace(v, indices=[rows[position] for position in v.indices]) for v in result.divergence_violations]
    return replace(result, divergence_violations=renamed)


def _torch_load(source: str | os.PathLike | io.BytesIO, where: str) -> object:
    """torch.load with weights_only=True; SnapshotError with the error's kind only (torch's
    message on a foreign file advises weights_only=False, which a snapshot never needs)."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds on a file it cannot unpickle
        raise SnapshotError(f"{where!r} is not a canary snapshot (torch.load: {type(error).__name__})") from None


def _valid_rows(req_pool_indices: Tensor, table_rows: int) -> Tensor:
    return (req_pool_indices >= 0) & (req_pool_indices < table_rows)


def _to_host(value: object) -> object:
    return value.cpu() if isinstance(value, Tensor) else value


def _mapping_with(value: object, keys: set[str], where: str) -> dict:
    if not isinstance(value, dict):
        raise SnapshotError(f"{where} is not a dict but a {type(value).__name__}")
    if set(value) != keys:
        raise SnapshotError(f"{where}: keys {sorted(value)} differ from {sorted(keys)}")
    return value
