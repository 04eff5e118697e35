"""sglang 0.5.23's own `SWATokenToKVPoolAllocator`, built without any KV memory.

sglang's allocator is handed a KV pool, and from it reads only the registered full-to-SWA
mapping (to translate indices) and a few optional attributes. A mapping-only pool stands in
for it, so the real allocator can be driven on CPU or CUDA at any page size.

sglang is imported only when an allocator is made; `.ci/install-sglang` installs it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

INSTALL_HINT = "run .ci/install-sglang [PYTHON] to install sglang 0.5.23's allocator"


class SglangUnavailableError(ImportError):
    """sglang's allocator cannot be imported in this environment."""


def make_sglang_allocator(
    size: int,
    size_swa: int,
    page_size: int,
    device: str | torch.device = "cpu",
    need_sort: bool = False,
    dtype: torch.dtype = torch.float16,
) -> Any:
    """sglang's `SWATokenToKVPoolAllocator(size, size_swa, page_size, ...)` over a mapping-only pool."""
    try:
        from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
        from sglang.srt.mem_cache.base_swa_memory_pool import BaseSWAKVPool
    except ImportError as error:
        raise SglangUnavailableError(f"sglang's SWA allocator is not importable ({error}); {INSTALL_HINT}") from error

    device = torch.device(device)
    allocator = SWATokenToKVPoolAllocator(
        size,
        size_swa,
        page_size,
        dtype,
        str(device),
        kvcache=_mapping_only_pool_class(BaseSWAKVPool)(),
        need_sort=need_sort,
    )
    if device.type == "cpu" and page_size > 1:
        # sglang picks Triton or torch paging kernels from the process's platform, not from
        # the allocator's device: on a CUDA host it would launch Triton kernels on CPU tensors.
        allocator.full_attn_allocator.use_triton_kernels = False
        allocator.swa_attn_allocator.use_triton_kernels = False
    return allocator


@functools.cache
def _mapping_only_pool_class(base: type) -> type:
    """A subclass of sglang's SWA KV pool base holding nothing but the mapping it is given."""

    class MappingOnlySWAKVPool(base):
        full_to_swa_index_mapping: torch.Tensor | None = None

        def __init__(self) -> None:
            # The KV pool base would allocate KV memory; the allocator never reads it.
            pass

        def register_mapping(self, full_to_swa_index_mapping: torch.Tensor) -> None:
            self.full_to_swa_index_mapping = full_to_swa_index_mapping

        def translate_loc_from_full_to_swa(self, kv_indices: torch.Tensor) -> torch.Tensor:
            return self.full_to_swa_index_mapping[kv_indices]

    # The KV data methods that the base declares abstract are never called by the allocator.
    MappingOnlySWAKVPool.__abstractmethods__ = frozenset()
    return MappingOnlySWAKVPool
