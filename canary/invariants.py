"""The invariant registry (SPEC §2): every invariant's name, severity and meaning.

State machines, the runtime canary, reports and findings all name invariants through this one
registry, by `Name`; `canary.probes` checks the model-free ones from allocator state alone.
Besides the SPEC's invariants, the registry holds the kinds of finding the harness itself
reports about a target (CONTRACT, DIFFERENTIAL, CRASH, HANG), so every finding has one name,
severity and meaning wherever it is printed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Sequence


class Name(str, enum.Enum):
    """An invariant's name. A `str`, so it compares equal to, hashes like and serialises as
    the bare name ("NODUP"): JSON reports, finding folders and old exported tests keep working."""

    SENTINEL = "SENTINEL"
    PAD = "PAD"
    NODUP = "NODUP"
    CONSERVE = "CONSERVE"
    SWA_LE_FULL = "SWA_LE_FULL"
    ATOMIC = "ATOMIC"
    AVAIL = "AVAIL"
    WINDOW = "WINDOW"
    STALE = "STALE"
    PAGE = "PAGE"
    XLAT = "XLAT"
    LEAK = "LEAK"
    CAPACITY = "CAPACITY"
    CONTRACT = "CONTRACT"
    DIFFERENTIAL = "DIFFERENTIAL"
    CRASH = "CRASH"
    HANG = "HANG"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Severity(enum.Enum):
    FATAL = "FATAL"
    """Data corruption, or a serving process lost: a KV slot may be read or written by the
    wrong request, or the scheduler stops."""
    GUARD = "GUARD"
    """Not corruption: latent (harmless now, corruption after a later legal call), or a
    refused service (CAPACITY)."""


class Checker(enum.Enum):
    """What can fire an invariant."""

    PROBE = "probe"
    """`canary.probes.run_probes`, from allocator state alone (the machines run it too)."""
    MODEL = "model"
    """The machines' per-step comparison with the reference model, or with a second allocator."""
    RUNNER = "runner"
    """The runner, from how a call to the target ended: it raised, or never returned."""


@dataclass(frozen=True)
class Invariant:
    name: Name
    severity: Severity
    description: str
    checker: Checker

    @property
    def model_free(self) -> bool:
        """True when `run_probes` checks it from allocator state alone."""
        return self.checker is Checker.PROBE


def registry(invariants: Iterable[Invariant]) -> dict[Name, Invariant]:
    """The invariants by name.

    Raises:
        ValueError: two invariants share a name.
    """
    by_name: dict[Name, Invariant] = {}
    for invariant in invariants:
        if invariant.name in by_name:
            raise ValueError(f"invariant {invariant.name} is registered twice")
        by_name[invariant.name] = invariant
    return by_name


_PROBE, _MODEL, _RUNNER = Checker.PROBE, Checker.MODEL, Checker.RUNNER
INVARIANTS: dict[Name, Invariant] = registry(
    (
        Invariant(Name.SENTINEL, Severity.FATAL, "mapping[-1] == -1", _PROBE),
        Invariant(Name.PAD, Severity.FATAL, "slot/page 0 is in no free list and is no live slot's SWA peer", _PROBE),
        Invariant(
            Name.NODUP,
            Severity.FATAL,
            "no free list holds a duplicate, no slot is both free and allocated, no allocation returns a slot twice",
            _PROBE,
        ),
        Invariant(
            Name.CONSERVE, Severity.FATAL, "free + allocated == capacity on each pool; available <= size", _PROBE
        ),
        Invariant(
            Name.SWA_LE_FULL,
            Severity.FATAL,
            "every allocated SWA slot is the peer of exactly one live full slot",
            _PROBE,
        ),
        Invariant(Name.ATOMIC, Severity.FATAL, "a failed allocation changes nothing", _MODEL),
        Invariant(Name.AVAIL, Severity.FATAL, "available_size() == min(full, swa)", _PROBE),
        Invariant(Name.WINDOW, Severity.FATAL, "every token inside a live request's window has an SWA slot", _MODEL),
        Invariant(
            Name.STALE, Severity.GUARD, "a free full slot, or an unallocated token of a live page, maps to 0", _PROBE
        ),
        Invariant(Name.PAGE, Severity.GUARD, "a full page's tokens map to one SWA page at the same offsets", _PROBE),
        Invariant(Name.XLAT, Severity.GUARD, "translate(x) == mapping[x]", _MODEL),
        Invariant(
            Name.LEAK, Severity.GUARD, "a token before the window (past the page margin) holds no SWA slot", _MODEL
        ),
        Invariant(
            Name.CAPACITY,
            Severity.GUARD,
            "an allocation both pools can serve returns slots, not None. A denial of service, not "
            "corruption: the caller sees the None and retracts or aborts requests, and no slot is "
            "read or written by the wrong request; so GUARD, reported after every FATAL finding",
            _MODEL,
        ),
        Invariant(
            Name.CONTRACT,
            Severity.GUARD,
            "results, free-list order, sizes and mapping are exactly what SPEC §1 prescribes",
            _MODEL,
        ),
        Invariant(
            Name.DIFFERENTIAL,
            Severity.GUARD,
            "two allocators given the same calls return the same values and keep the same sizes, "
            "free units and mapping",
            _MODEL,
        ),
        # A call the target's contract promises to handle raised: in a serving engine the
        # exception takes the scheduler down with every request in flight.
        Invariant(
            Name.CRASH,
            Severity.FATAL,
            "every call the contract allows returns (a result, or None when out of memory); none raises",
            _RUNNER,
        ),
        # A call never returned: the scheduler stalls holding every request's KV state, which
        # loses the serving process exactly as a crash does, so it is as severe as CRASH.
        Invariant(Name.HANG, Severity.FATAL, "every call returns within the runner's time limit", _RUNNER),
    )
)


@dataclass(frozen=True)
class Violation:
    invariant: Name
    severity: Severity
    count: int
    """How many items break the invariant (may exceed len(indices))."""
    indices: list[int]
    """The first offending items (tokens, slots or units: `detail` says which)."""
    detail: str

    def __post_init__(self) -> None:
        if not isinstance(self.invariant, Name):  # a bare name, e.g. from a parsed record
            object.__setattr__(self, "invariant", Name(self.invariant))

    def explain(self) -> str:
        """One line, e.g. "FATAL SWA_LE_FULL: 2 SWA slots are peers of two or more full tokens: [5, 9]"."""
        line = f"{self.severity.value} {self.invariant}: {self.count} {self.detail}"
        if self.indices:
            line += f": {self.indices}"
            if len(self.indices) < self.count:
                line += f" (first {len(self.indices)} shown)"
        return line


class InvariantViolation(AssertionError):
    """Raised when a check finds violations; `.invariant` / `.severity` name the most severe
    (the first FATAL one, else the first)."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        if not violations:
            raise ValueError("InvariantViolation needs at least one violation")
        self.violations = list(violations)
        worst = next((v for v in self.violations if v.severity is Severity.FATAL), self.violations[0])
        self.invariant = worst.invariant
        self.severity = worst.severity
        super().__init__("\n".join(v.explain() for v in self.violations))
