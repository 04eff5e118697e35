"""The invariant registry (SPEC §2): every invariant's name, severity and meaning.

State machines, the runtime canary, reports and findings all name invariants through this one
registry; `canary.probes` checks the model-free ones from allocator state alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence


class Severity(enum.Enum):
    FATAL = "FATAL"
    """Data corruption: a KV slot may be read or written by the wrong request."""
    GUARD = "GUARD"
    """Latent: harmless now, corruption after a later legal call."""


@dataclass(frozen=True)
class Invariant:
    name: str
    severity: Severity
    description: str
    model_free: bool
    """True when `run_probes` checks it from allocator state alone."""


INVARIANTS: dict[str, Invariant] = {
    invariant.name: invariant
    for invariant in (
        Invariant("SENTINEL", Severity.FATAL, "mapping[-1] == -1", True),
        Invariant("PAD", Severity.FATAL, "slot/page 0 is in no free list and is no live slot's SWA peer", True),
        Invariant(
            "NODUP",
            Severity.FATAL,
            "no free list holds a duplicate, no slot is both free and allocated, no allocation returns a slot twice",
            True,
        ),
        Invariant("CONSERVE", Severity.FATAL, "free + allocated == capacity on each pool; available <= size", True),
        Invariant(
            "SWA_LE_FULL",
            Severity.FATAL,
            "every allocated SWA slot is the peer of exactly one live full slot",
            True,
        ),
        Invariant("ATOMIC", Severity.FATAL, "a failed allocation changes nothing", False),
        Invariant("AVAIL", Severity.FATAL, "available_size() == min(full, swa)", True),
        Invariant("WINDOW", Severity.FATAL, "every token inside a live request's window has an SWA slot", False),
        Invariant("STALE", Severity.GUARD, "a free full slot, or an unallocated token of a live page, maps to 0", True),
        Invariant("PAGE", Severity.GUARD, "a full page's tokens map to one SWA page at the same offsets", True),
        Invariant("XLAT", Severity.GUARD, "translate(x) == mapping[x]", False),
        Invariant("LEAK", Severity.GUARD, "a token before the window (past the page margin) holds no SWA slot", False),
        Invariant(
            "CONTRACT",
            Severity.GUARD,
            "results, free-list order, sizes and mapping are exactly what SPEC §1 prescribes",
            False,
        ),
        Invariant(
            "DIFFERENTIAL",
            Severity.GUARD,
            "two allocators given the same calls return the same values and keep the same sizes, "
            "free units and mapping",
            False,
        ),
    )
}


@dataclass(frozen=True)
class Violation:
    invariant: str
    severity: Severity
    count: int
    """How many items break the invariant (may exceed len(indices))."""
    indices: list[int]
    """The first offending items (tokens, slots or units: `detail` says which)."""
    detail: str

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
