"""Target factories that cannot work, for the command-line error tests: each must be a usage
error (exit 2) before any run, never a finding."""

from __future__ import annotations

from typing import Any

from properties.targets import AllocatorConfig, reference_factory


def returns_none(config: AllocatorConfig) -> None:
    """Builds nothing."""
    return None


def returns_a_dict(config: AllocatorConfig) -> dict:
    """Builds something that is no allocator."""
    return {"size": config.size}


def raises(config: AllocatorConfig) -> Any:
    """Fails to build at all."""
    raise RuntimeError("no allocator today")


class HalfAnAllocator:
    """Has the sizes and the mapping, but no way to allocate or free."""

    def __init__(self, config: AllocatorConfig) -> None:
        whole = reference_factory(config)
        self.full_to_swa_index_mapping = whole.full_to_swa_index_mapping
        self.page_size = whole.page_size
        self.available_size = whole.available_size


NOT_CALLABLE = 42
