"""After every step: read the allocator back once, then compare it with the reference model.

`observe` gathers everything a step's checks need (mapping, both free lists, the translation
of every index, the packed probe results, the call's result) into one tensor and copies it to
the host once. `check_step` turns the observation into violations of the named invariants of
the registry: first the model-free probes, then the model-based invariants, and last CONTRACT
(the exact SPEC §1 behaviour), reported only when nothing more specific explains a difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import torch

from allocator.interface import SWAAllocator
from canary.invariants import INVARIANTS, Name, Severity, Violation
from canary.probes import AllocatorView, ProbeResults, run_probes
from properties.compare import AllocatorState, FreeList, differences
from properties.machines.model import Request, SWAModel


@dataclass(frozen=True)
class Observed:
    mapping: list[int]
    full_free: list[int]
    swa_free: list[int]
    translated: list[int]
    result: list[int] | None
    full_available: int
    swa_available: int
    available: int
    in_free_group: bool
    probe_violations: list[Violation]
    has_sentinel: bool = True

    @property
    def state(self) -> "State":
        return State(self.mapping, self.full_free, self.swa_free)

    def as_allocator_state(self) -> AllocatorState:
        """Everything `properties.compare.differences` compares, free lists in their order."""
        return AllocatorState(
            result=self.result,
            sizes=(self.full_available, self.swa_available, self.available),
            mapping=self.mapping,
            full_free=FreeList(self.full_free),
            swa_free=FreeList(self.swa_free),
            in_free_group=self.in_free_group,
        )


class State(NamedTuple):
    """The mapping and both free lists (ready, then staged) as read back."""

    mapping: list[int]
    full_free: list[int]
    swa_free: list[int]


def observe(allocator: SWAAllocator, result: torch.Tensor | None) -> Observed:
    """One device-to-host copy of everything the checks read."""
    view = AllocatorView.of(allocator)
    probes = run_probes(view)
    # Without a sentinel (MappingLayout.PADDED) translating -1 is no call the allocator takes.
    first = 0 if Name.SENTINEL in view.inapplicable else -1
    every_index = torch.arange(first, view.mapping.numel() - 1, device=view.mapping.device)
    translated = allocator.translate_loc_from_full_to_swa(every_index)
    parts = [view.mapping, view.full_free, view.swa_free, translated, probes.packed.flatten()]
    if result is not None:
        parts.append(result.to(torch.int64))
    host = torch.cat([part.reshape(-1).to(view.mapping.device) for part in parts]).cpu()
    pieces = iter(torch.split(host, [part.numel() for part in parts]))
    mapping, full_free, swa_free, translated_host, packed = (next(pieces) for _ in range(5))
    return Observed(
        mapping=mapping.tolist(),
        full_free=full_free.tolist(),
        swa_free=swa_free.tolist(),
        translated=translated_host.tolist(),
        result=None if result is None else next(pieces).tolist(),
        full_available=view.full_available,
        swa_available=view.swa_available,
        available=view.available,
        in_free_group=view.in_free_group,
        has_sentinel="SENTINEL" not in view.inapplicable,
        probe_violations=ProbeResults.from_packed(probes.names, packed.reshape(probes.packed.shape)).read(),
    )


@dataclass
class Expectation:
    """What the model says the step just taken should have done."""

    call: str
    result: list[int] | None = None
    is_allocation: bool = False
    live_before: set[int] = field(default_factory=set)
    breach: str = ""
    """A SPEC rule the call broke that the state need not show (e.g. a misuse that did not raise)."""


def violation(name: Name, indices: Iterable[int], detail: str) -> Violation:
    indices = list(indices)
    return Violation(name, INVARIANTS[name].severity, len(indices), indices[:8], detail)


def check_step(
    observed: Observed,
    previous: State | None,
    model: SWAModel,
    expectation: Expectation,
    live_tokens: set[int],
    requests: Iterable[Request] = (),
    window: int | None = None,
) -> list[Violation]:
    """Every violation the step shows, most severe first. An allocation the model served and
    the allocator refused is CAPACITY; the model then holds slots the allocator never handed
    out, so only the model-free probes and the refusal's own checks (ATOMIC) run with it."""
    found = list(observed.probe_violations)
    found += _check_result(observed, previous, expectation, model.page_size)
    if refused(observed, expectation):
        refused_slots = expectation.result or []
        detail = f"slots {expectation.call} refused (returned None) though both pools could serve them"
        found.append(violation(Name.CAPACITY, refused_slots, detail))
        return sorted(found, key=lambda v: v.severity is not Severity.FATAL)
    found += _check_pools(observed, model)
    found += _check_mapping(observed, model, live_tokens)
    if window is not None:
        found += _check_windows(observed, requests, window)
    found += _check_translation(observed)
    if not found:
        found += _check_contract(observed, model, expectation)
    return sorted(found, key=lambda v: v.severity is not Severity.FATAL)


def refused(observed: Observed, expectation: Expectation) -> bool:
    """An allocation that returned None where the model served it."""
    return expectation.is_allocation and observed.result is None and expectation.result is not None


def _check_result(
    observed: Observed, previous: State | None, expectation: Expectation, page_size: int
) -> list[Violation]:
    found: list[Violation] = []
    if not expectation.is_allocation:
        return found
    if observed.result is None:
        if previous is not None and observed.state != previous:
            found.append(violation(Name.ATOMIC, [], f"{expectation.call} returned None but changed the allocator"))
        return found
    result = observed.result
    repeated = [token for token in set(result) if result.count(token) > 1]
    reused = [token for token in result if token in expectation.live_before]
    if repeated or reused:
        found.append(
            violation(Name.NODUP, repeated + reused, f"{expectation.call} returned slots twice or slots in use")
        )
    padding = [token for token in result if token < page_size]
    if padding:
        found.append(violation(Name.PAD, padding, f"{expectation.call} handed out the padding slot or page"))
    return found


def _check_pools(observed: Observed, model: SWAModel) -> list[Violation]:
    found = []
    for name, free, pool in (("full", observed.full_free, model.full), ("swa", observed.swa_free, model.swa)):
        in_use = pool.allocated | set(pool.pending or ())
        both = sorted(set(free) & pool.allocated)
        if both:
            found.append(violation(Name.NODUP, both, f"{name} units both free and allocated"))
        elif len(set(free)) + len(in_use) != pool.num_units:
            missing = sorted(set(range(1, pool.num_units + 1)) - set(free) - in_use)
            found.append(
                violation(
                    Name.CONSERVE,
                    missing,
                    f"{name} pool: {len(set(free))} free + {len(in_use)} in use != {pool.num_units} units",
                )
            )
    return found


def _check_mapping(observed: Observed, model: SWAModel, live_tokens: set[int]) -> list[Violation]:
    found = []
    ps = model.page_size
    mapping = observed.mapping[:-1]
    stale = [token for token, peer in enumerate(mapping) if peer != 0 and token not in live_tokens]
    if stale:
        found.append(violation(Name.STALE, stale, "full slots that are not live still map to an SWA slot"))
    referenced = {mapping[token] // ps for token in live_tokens if 0 < token < len(mapping) and mapping[token] > 0}
    orphaned = sorted(model.swa.allocated - referenced)
    wild = sorted(referenced - model.swa.allocated)
    if orphaned or wild:
        found.append(
            violation(
                Name.SWA_LE_FULL,
                orphaned + wild,
                f"SWA units allocated but no live peer: {orphaned[:8]}; "
                f"live peers on unallocated SWA units: {wild[:8]}",
            )
        )
    return found


def _check_windows(observed: Observed, requests: Iterable[Request], window: int) -> list[Violation]:
    missing, leaked = [], []
    mapping = observed.mapping
    for request in requests:
        start = request.needs_swa_from(window)
        missing += [t for t in request.tokens[start:] if mapping[t] == 0]
        leaked += [t for t in request.tokens[: request.evict_floor] if mapping[t] != 0]
    found = []
    if missing:
        found.append(violation(Name.WINDOW, missing, "tokens inside a live request's window have no SWA slot"))
    if leaked:
        found.append(violation(Name.LEAK, leaked, "tokens already evicted from the window still hold an SWA slot"))
    return found


def _check_translation(observed: Observed) -> list[Violation]:
    first = -1 if observed.has_sentinel else 0
    expected = ([-1] if observed.has_sentinel else []) + observed.mapping[:-1]
    wrong = [index + first for index, (got, want) in enumerate(zip(observed.translated, expected)) if got != want]
    if wrong:
        return [violation(Name.XLAT, wrong, "translate_loc_from_full_to_swa(x) != mapping[x]")]
    return []


def _check_contract(observed: Observed, model: SWAModel, expectation: Expectation) -> list[Violation]:
    found = [expectation.breach] if expectation.breach else []
    expected = _expected_state(model, expectation.result)
    found += differences(observed.as_allocator_state(), expected, ("the allocator", "the model"))
    if found:
        return [violation(Name.CONTRACT, [], f"after {expectation.call}: " + "; ".join(found))]
    return []


def state_differences(observed: Observed, model: SWAModel) -> list[str]:
    """Where the allocator's state (sizes, mapping, free lists, free-group flag) is not the
    model's, whatever the call returned; empty when they agree."""
    expected = _expected_state(model, observed.result)
    return differences(observed.as_allocator_state(), expected, ("the allocator", "the model"))


def _expected_state(model: SWAModel, result: list[int] | None) -> AllocatorState:
    return AllocatorState(
        result=result,
        sizes=(model.full.available(), model.swa.available(), model.available()),
        mapping=model.dense_mapping(),
        full_free=FreeList(model.full.free, model.full.staged),
        swa_free=FreeList(model.swa.free, model.swa.staged),
        in_free_group=model.in_group,
    )
