"""Which allocator the machines drive: the reference, sglang's, or any `module:factory`.

A factory takes an `AllocatorConfig` and returns an object with the SPEC §1 interface.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from allocator import SWATokenToKVPoolAllocator


class TargetError(ValueError):
    """A --target / SWA_TARGET spec that does not name a usable allocator factory."""


@dataclass(frozen=True)
class AllocatorConfig:
    size: int
    size_swa: int
    page_size: int
    device: str = "cpu"
    need_sort: bool = False
    dtype: torch.dtype = torch.float16


Factory = Callable[[AllocatorConfig], Any]


def reference_factory(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
    """The built-in reference allocator, in checked mode."""
    return SWATokenToKVPoolAllocator(
        config.size,
        config.size_swa,
        config.page_size,
        config.dtype,
        config.device,
        need_sort=config.need_sort,
        checked=True,
    )


def sglang_factory(config: AllocatorConfig) -> Any:
    """sglang's own allocator (needs the `sglang` extra, see .ci/install-sglang)."""
    from allocator.sglang_adapter import make_sglang_allocator

    return make_sglang_allocator(
        config.size, config.size_swa, config.page_size, config.device, config.need_sort, config.dtype
    )


BUILTIN_TARGETS: dict[str, Factory] = {"reference": reference_factory, "sglang": sglang_factory}


def resolve_target(spec: str) -> Factory:
    """'reference', 'sglang', or 'package.module:factory'."""
    if spec in BUILTIN_TARGETS:
        return BUILTIN_TARGETS[spec]
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise TargetError(f"target {spec!r} is neither {sorted(BUILTIN_TARGETS)} nor 'module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TargetError(f"cannot import target module {module_name!r}: {error}") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise TargetError(f"{module_name!r} has no callable {attribute!r}")
    return factory
