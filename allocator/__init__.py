"""The system under test: a reference SWA hybrid KV-cache allocator (SPEC §1)."""

from allocator.errors import (
    AllocatorError,
    ConfigIntegerError,
    ContiguityError,
    DoubleFreeError,
    FreeGroupError,
    IndexIntegerError,
    IntegerError,
    InvalidConfigError,
    InvalidIndexError,
    InvalidStateError,
    SWAPeerHeldError,
    UnsupportedOperationError,
)
from allocator.paged import PagedTokenToKVPoolAllocator
from allocator.swa import SWAState, SWATokenToKVPoolAllocator
from allocator.token import TokenToKVPoolAllocator

__all__ = [
    "AllocatorError",
    "ConfigIntegerError",
    "ContiguityError",
    "DoubleFreeError",
    "FreeGroupError",
    "IndexIntegerError",
    "IntegerError",
    "InvalidConfigError",
    "InvalidIndexError",
    "InvalidStateError",
    "PagedTokenToKVPoolAllocator",
    "SWAPeerHeldError",
    "SWAState",
    "SWATokenToKVPoolAllocator",
    "TokenToKVPoolAllocator",
    "UnsupportedOperationError",
]
