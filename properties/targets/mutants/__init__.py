"""Mutants of the reference allocator: each is `SWATokenToKVPoolAllocator` with ONE realistic
bug, used to check that the state machines and the invariant registry catch real faults.

Every mutant is a small subclass overriding one method (a free-group or pool bug may need
the two or three methods that share the faulty bookkeeping). Its docstring names the bug
class and the public report it comes from (numbers are sgl-project/sglang pull requests
and issues unless said otherwise); a class that comes from the SPEC rather than a report
says so. `breaks` lists the invariants the bug breaks at the step where it shows: which of
them a check reports first depends on the program that reaches it.

Bugs that live inside a pool (merge, free-list order, the paged index arithmetic) are pool
subclasses; `PoolMutant` gives both pools of the hybrid allocator the mutated class, as
sharing one pool implementation does in a real engine.

Checked mode (`checked_mode`) is on, as in the reference target, unless it would turn the
bug into a typed error before any invariant can see it: such a mutant sets it off and says
why.
"""

from __future__ import annotations

from typing import Callable

from properties.targets import AllocatorConfig, build_allocator
from properties.targets.mutants.allocation import (
    DecodeWrongPageAtBoundary,
    ExtendIgnoresLastPageContiguity,
    MergeForgetsStaged,
    NonAtomicPair,
    PrecheckIgnoresStaged,
    SwaLastLocUntranslated,
    TokenFreeGoesToFront,
)
from properties.targets.mutants.base import Mutant, PoolMutant
from properties.targets.mutants.fixtures import FIXTURES
from properties.targets.mutants.frees_and_state import (
    AvailableUsesMax,
    ClearDropsSentinel,
    FreeKeepsMapping,
    FreeSwaReleasesPad,
    FreeSwaTokenGranular,
    RestoreSkipsMapping,
    TranslateOffByOne,
)
from properties.targets.mutants.tails_and_groups import (
    ClearLeavesGroupOpen,
    GroupEndFlushesTwice,
    GroupResolvesAtEnd,
    NestedBeginDropsPending,
    TailMapsNonTailSlots,
    TailMapsPaddedEnd,
    TailStartRoundedUp,
)

__all__ = [
    "MUTANTS",
    "FIXTURES",
    "Mutant",
    "PoolMutant",
    "mutant_factory",
    "AvailableUsesMax",
    "ClearDropsSentinel",
    "ClearLeavesGroupOpen",
    "DecodeWrongPageAtBoundary",
    "ExtendIgnoresLastPageContiguity",
    "FreeKeepsMapping",
    "FreeSwaReleasesPad",
    "FreeSwaTokenGranular",
    "GroupEndFlushesTwice",
    "GroupResolvesAtEnd",
    "MergeForgetsStaged",
    "NestedBeginDropsPending",
    "NonAtomicPair",
    "PrecheckIgnoresStaged",
    "RestoreSkipsMapping",
    "SwaLastLocUntranslated",
    "TailMapsNonTailSlots",
    "TailMapsPaddedEnd",
    "TailStartRoundedUp",
    "TokenFreeGoesToFront",
    "TranslateOffByOne",
]

MUTANTS: dict[str, type[Mutant]] = {
    "tail_maps_non_tail_slots": TailMapsNonTailSlots,
    "tail_maps_padded_end": TailMapsPaddedEnd,
    "tail_start_rounded_up": TailStartRoundedUp,
    "group_resolves_at_end": GroupResolvesAtEnd,
    "group_end_flushes_twice": GroupEndFlushesTwice,
    "nested_begin_drops_pending": NestedBeginDropsPending,
    "clear_leaves_group_open": ClearLeavesGroupOpen,
    "extend_ignores_last_page_contiguity": ExtendIgnoresLastPageContiguity,
    "decode_wrong_page_at_boundary": DecodeWrongPageAtBoundary,
    "merge_forgets_staged": MergeForgetsStaged,
    "non_atomic_pair": NonAtomicPair,
    "precheck_ignores_staged": PrecheckIgnoresStaged,
    "swa_last_loc_untranslated": SwaLastLocUntranslated,
    "token_free_goes_to_front": TokenFreeGoesToFront,
    "free_swa_token_granular": FreeSwaTokenGranular,
    "free_swa_releases_pad": FreeSwaReleasesPad,
    "free_keeps_mapping": FreeKeepsMapping,
    "restore_skips_mapping": RestoreSkipsMapping,
    "clear_drops_sentinel": ClearDropsSentinel,
    "translate_off_by_one": TranslateOffByOne,
    "available_uses_max": AvailableUsesMax,
}


def mutant_factory(name: str) -> Callable[[AllocatorConfig], Mutant]:
    """A factory for `run_check(target=...)` that builds the named mutant."""
    if name not in MUTANTS:
        raise KeyError(f"no mutant {name!r}; known: {', '.join(sorted(MUTANTS))}")
    mutant = MUTANTS[name]

    def factory(config: AllocatorConfig) -> Mutant:
        return build_allocator(mutant, config, checked=mutant.checked_mode)

    factory.__name__ = f"mutant:{name}"
    return factory
