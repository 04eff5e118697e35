"""Runtime correctness canary for SWA KV-cache allocators: the invariant registry and the
model-free probes (SPEC §2); see also `canary.divergence`."""

from canary.probes import (
    INVARIANTS,
    AllocatorView,
    Invariant,
    InvariantViolation,
    ProbeInputError,
    ProbeResults,
    Severity,
    Violation,
    run_probes,
)

__all__ = [
    "INVARIANTS",
    "AllocatorView",
    "Invariant",
    "InvariantViolation",
    "ProbeInputError",
    "ProbeResults",
    "Severity",
    "Violation",
    "run_probes",
]
