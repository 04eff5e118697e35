"""The base classes of the mutant catalogue: what a mutant breaks, and how a pool bug reaches
both pools."""

from __future__ import annotations

from typing import Any

from allocator import (
    PagedTokenToKVPoolAllocator,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from canary.invariants import Name


class Mutant(SWATokenToKVPoolAllocator):
    """Base of every mutant: the invariants its bug breaks, and its checked mode."""

    breaks: tuple[Name, ...] = ()
    checked_mode: bool = True


class PoolMutant(Mutant):
    """A mutant whose bug lives in a pool class: both pools of that page size take it."""

    token_pool: type[TokenToKVPoolAllocator] | None = None
    paged_pool: type[PagedTokenToKVPoolAllocator] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        mutated = self.paged_pool if self.page_size > 1 else self.token_pool
        if mutated is not None:
            for pool in (self.full_attn_allocator, self.swa_attn_allocator):
                pool.__class__ = mutated
