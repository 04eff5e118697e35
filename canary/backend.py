"""Which implementation runs a device check: the torch expression or the fused Triton kernels.

The probes and the divergence detector each have both (`<package>.torch_backend`,
`<package>.triton_backend`), packing identical results. `choose_backend` picks one from the
caller's `impl` and the tensors' device, in the same way for both.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Literal

import torch

Impl = Literal["auto", "torch", "triton"]
IMPLS: tuple[Impl, ...] = ("auto", "torch", "triton")


def choose_backend(impl: str, device: torch.device, package: str, error: type[Exception]) -> ModuleType | None:
    """The Triton backend module of `package` when `impl` selects it for `device`, None for
    the torch implementation.

    Args:
        impl: "torch"; "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
            "auto": Triton on CUDA when it imports, torch otherwise (interpreted kernels copy
            every tensor to the host, so they are never the automatic choice).
        device: where the checked tensors live.
        package: the check's package, e.g. "canary.probes".
        error: the caller's input error type, raised for an impl that cannot run.

    Returns:
        `package.triton_backend`, or None.
    """
    if impl not in IMPLS:
        raise error(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch" or (impl == "auto" and device.type != "cuda"):
        return None
    try:
        kernels = importlib.import_module(f"{package}.triton_backend")
    except ImportError as exc:
        if impl == "auto":
            return None
        raise error("impl='triton' needs the triton package") from exc
    if impl == "auto" and kernels.INTERPRETED:
        return None
    if device.type != "cuda" and not kernels.INTERPRETED:
        raise error(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import), got {device}")
    return kernels
