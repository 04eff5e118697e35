"""sglang's own `SWATokenToKVPoolAllocator`, of whichever release is installed, built without
any KV memory.

sglang's allocator is handed a KV pool, and from it reads only the registered full-to-SWA
mapping (to translate indices) and a few optional attributes. A mapping-only pool stands in
for it, so the real allocator can be driven on CPU or CUDA at any page size it supports.

Releases differ (docs/sglang-releases.md): the class moved from `mem_cache/allocator.py`
(0.4.9-0.5.7) to `mem_cache/swa_memory_pool.py` (0.5.8-0.5.12) to `mem_cache/allocator/swa.py`
(0.5.13 on); its constructor gained `need_sort` (0.5.1) and `page_size` (0.5.8); the KV pool it
type-checks is `SWAKVPool` or `BaseSWAKVPool`. Everything here is read from the installed
release: the module that holds the class, the constructor's parameters, the pool type its
`kvcache` parameter names, and (`sglang_capabilities`) what a built allocator can be called with.

sglang is imported only when an allocator is made; `.ci/install-sglang --version V` installs it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any

import torch

from allocator.interface import SWAAllocator

if TYPE_CHECKING:
    from properties.targets import TargetCapabilities

INSTALL_HINT = "run .ci/install-sglang [--version V] [PYTHON] to install an sglang release's allocator"

ALLOCATOR_MODULES = (
    "sglang.srt.mem_cache.allocator.swa",
    "sglang.srt.mem_cache.swa_memory_pool",
    "sglang.srt.mem_cache.allocator",
)
"""Where releases keep SWATokenToKVPoolAllocator, newest first."""

PADDED_LAYOUT = "padded"
"""`mapping_layout` of releases up to 0.5.7: size + size_swa + 1 entries, all tokens' entries
first, no -1 sentinel (canary.probes.MappingLayout)."""


class SglangUnavailableError(ImportError):
    """sglang's allocator cannot be imported in this environment."""


class SglangUnsupportedError(ValueError):
    """The installed release cannot be built with the asked configuration (e.g. a page size
    above 1 on a release whose constructor has no page_size)."""


@functools.cache
def find_sglang_allocator_class() -> type:
    """The installed release's SWATokenToKVPoolAllocator, wherever that release keeps it."""
    _interpret_triton_without_a_gpu()
    errors = []
    for name in ALLOCATOR_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            errors.append(f"{name}: {error}")
            continue
        cls = getattr(module, "SWATokenToKVPoolAllocator", None)
        if isinstance(cls, type):
            return cls
        errors.append(f"{name}: no SWATokenToKVPoolAllocator")
    raise SglangUnavailableError(f"sglang's SWA allocator is not importable ({'; '.join(errors)}); {INSTALL_HINT}")


def _interpret_triton_without_a_gpu() -> None:
    """Up to 0.5.21 the paged allocator launches its Triton kernels whatever the tensors'
    device. Without a GPU only Triton's interpreter runs them, and it has to be chosen before
    triton is first imported (triton compiles its own helpers at import)."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def installed_sglang_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        raise SglangUnavailableError(f"sglang is not installed; {INSTALL_HINT}") from None


def _constructor_parameters(cls: Any) -> dict[str, inspect.Parameter]:
    parameters = dict(inspect.signature(cls.__init__).parameters)
    parameters.pop("self", None)
    return parameters


@functools.cache
def _kv_pool_base(cls: type) -> type:
    """The KV pool class the constructor's `kvcache` parameter names (the releases assert
    isinstance against it): resolved in the allocator module's own namespace, since the
    releases write their annotations as strings."""
    annotation = _constructor_parameters(cls)["kvcache"].annotation
    if isinstance(annotation, str):
        namespace = vars(importlib.import_module(cls.__module__))
        annotation = namespace.get(annotation.rpartition(".")[2])
    if not isinstance(annotation, type):
        raise SglangUnavailableError(
            f"cannot tell the KV pool type {cls.__module__}.{cls.__name__} expects; {INSTALL_HINT}"
        )
    return annotation


def make_sglang_allocator(
    size: int,
    size_swa: int,
    page_size: int,
    device: str | torch.device = "cpu",
    need_sort: bool | None = False,
    dtype: torch.dtype = torch.float16,
) -> SWAAllocator:
    """The installed release's `SWATokenToKVPoolAllocator` over a mapping-only pool (need_sort
    None: the release's own behaviour where it has no need_sort parameter, else False)."""
    cls = find_sglang_allocator_class()
    allocator = _build(cls, size, size_swa, page_size, torch.device(device), need_sort, dtype)
    if _has_padded_layout(cls):
        # Tells the probes how to read the mapping (canary.probes.MappingLayout).
        allocator.mapping_layout = PADDED_LAYOUT
    return allocator


@functools.cache
def _has_padded_layout(cls: type) -> bool:
    """Whether the release's mapping has size + size_swa + 1 entries (no sentinel): read from a
    small allocator whose two layouts differ in length (they coincide when size_swa == 1)."""
    mapping = _build(cls, 8, 4, 1, torch.device("cpu"), None, torch.float16).full_to_swa_index_mapping
    return mapping.numel() == 8 + 4 + 1


def _build(
    cls: type,
    size: int,
    size_swa: int,
    page_size: int,
    device: torch.device,
    need_sort: bool | None,
    dtype: torch.dtype,
) -> Any:
    parameters = _constructor_parameters(cls)
    if need_sort is None:
        need_sort = "need_sort" not in parameters and _always_sorts(cls)
    given = {
        "size": size,
        "size_swa": size_swa,
        "page_size": page_size,
        "dtype": dtype,
        "device": str(device),
        "kvcache": _mapping_only_pool_class(_kv_pool_base(cls))(),
        "need_sort": need_sort,
    }
    # A release without a parameter behaves as its absent value: page size 1, and sorting as
    # that release always does.
    for name, implied in (("page_size", 1), ("need_sort", "need_sort" not in parameters and _always_sorts(cls))):
        if name not in parameters and given.pop(name) != implied:
            raise SglangUnsupportedError(
                f"sglang {installed_sglang_version()}'s allocator has no {name} parameter: only {name}={implied}"
            )
    required = [
        p.name
        for p in parameters.values()
        if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    unknown = sorted(set(required) - set(given))
    if unknown:
        raise SglangUnavailableError(
            f"{cls.__module__}.{cls.__name__} needs parameters this adapter does not know: {unknown}"
        )
    allocator = cls(**{name: value for name, value in given.items() if name in parameters})
    if device.type == "cpu" and page_size > 1:
        # sglang picks Triton or torch paging kernels from the process's platform, not from
        # the allocator's device: on a CUDA host it would launch Triton kernels on CPU tensors.
        # (0.5.22 on; earlier releases have Triton kernels only, which Triton's interpreter
        # runs on CPU: _interpret_triton_without_a_gpu.)
        for pool in (allocator.full_attn_allocator, allocator.swa_attn_allocator):
            if hasattr(pool, "use_triton_kernels"):
                pool.use_triton_kernels = False
    return allocator


@functools.cache
def _always_sorts(cls: type) -> bool:
    """Whether a release without the need_sort parameter stages every free and merges sorted, as
    need_sort=True does (0.4.9.post6 - 0.5.0rc0), rather than freeing straight back (0.4.9):
    read from where one free of a small allocator goes."""
    allocator = cls(
        size=4, size_swa=4, dtype=torch.float16, device="cpu", kvcache=_mapping_only_pool_class(_kv_pool_base(cls))()
    )
    allocator.free(allocator.alloc(1))
    return len(getattr(allocator.full_attn_allocator, "release_pages", ())) > 0


def _raises_not_implemented(call: Any) -> bool:
    try:
        call()
    except NotImplementedError:
        return True
    return False


@functools.cache
def sglang_capabilities() -> TargetCapabilities:
    """What the installed release's allocator can be called with at all, read from it: its
    constructor's parameters, the methods it has, the ones that raise NotImplementedError, and
    the layout of a small allocator's mapping."""
    from properties.targets import TargetCapabilities

    cls = find_sglang_allocator_class()
    parameters = _constructor_parameters(cls)
    probe = make_sglang_allocator(size=8, size_swa=4, page_size=1, need_sort=None)
    paged = "page_size" in parameters and _paged_allocation_runs_here()
    return TargetCapabilities(
        paged=paged,
        need_sort="need_sort" in parameters,
        unsorted_frees="need_sort" in parameters or not _always_sorts(cls),
        alloc_extend_swa_tail=callable(getattr(cls, "alloc_extend_swa_tail", None)),
        free_full=callable(getattr(cls, "free_full", None)),
        free_groups=callable(getattr(cls, "free_group_begin", None)) and callable(getattr(cls, "free_group_end", None)),
        backup_restore=callable(getattr(cls, "backup_state", None)) and not _raises_not_implemented(probe.backup_state),
        decode_beyond_capacity=paged and not _decode_kernel_reads_past_the_free_list_here(),
        available_size=not _raises_not_implemented(probe.available_size),
        mapping_sentinel=not _has_padded_layout(cls),
    )


def _decode_kernel_reads_past_the_free_list_here() -> bool:
    """Whether an alloc_decode beyond capacity would crash this process: releases whose paged
    allocator has no torch path (no `use_triton_kernels`, up to 0.5.21) run a decode kernel
    that loads from the free list before checking its length. On a GPU that load reads memory
    past the list and its result is dropped; Triton's interpreter (no GPU) dereferences it."""
    paged = make_sglang_allocator(size=8, size_swa=8, page_size=2).full_attn_allocator
    return not hasattr(paged, "use_triton_kernels") and not torch.cuda.is_available()


def _paged_allocation_runs_here() -> bool:
    """Whether one paged alloc_extend runs on this host's device (releases up to 0.5.21 have
    Triton kernels only: a host whose Triton cannot launch them cannot drive page sizes > 1)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allocator = make_sglang_allocator(size=8, size_swa=8, page_size=2, device=device)
    one, none = torch.ones(1, dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.int64, device=device)
    try:
        allocator.alloc_extend(none, none.cpu(), one, one.cpu(), none - 1, 1)
    except Exception:  # whatever Triton raises (no driver, no interpreter), the call cannot run here
        return False
    return True


@functools.cache
def _mapping_only_pool_class(base: type) -> type:
    """A subclass of the release's SWA KV pool type holding nothing but the mapping it is given."""

    class MappingOnlySWAKVPool(base):
        full_to_swa_index_mapping: torch.Tensor | None = None
        # Releases up to 0.5.7 hand these sub-pools to their token allocators, which keep
        # them for KV copies the machines never make.
        full_kv_pool = None
        swa_kv_pool = None

        def __init__(self) -> None:
            # The KV pool base would allocate KV memory; the allocator never reads it.
            pass

        def register_mapping(self, full_to_swa_index_mapping: torch.Tensor) -> None:
            self.full_to_swa_index_mapping = full_to_swa_index_mapping

        def translate_loc_from_full_to_swa(self, kv_indices: torch.Tensor) -> torch.Tensor:
            mapping = self.full_to_swa_index_mapping
            assert mapping is not None, "sglang's allocator registers its mapping when it is built"
            return mapping[kv_indices]

    # The KV data methods that the base declares abstract are never called by the allocator.
    MappingOnlySWAKVPool.__abstractmethods__ = frozenset()
    return MappingOnlySWAKVPool
