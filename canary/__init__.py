"""Runtime correctness canary for SWA KV-cache allocators: the invariant registry and the
model-free probes (SPEC §2), the divergence detector (§3) and the runtime monitor (§4)."""

from canary.divergence import DivergenceCounts, detect_divergence
from canary.invariants import (
    INVARIANTS,
    Invariant,
    InvariantViolation,
    Severity,
    Violation,
)
from canary.monitor import CanaryMonitor, attach
from canary.probes import AllocatorView, ProbeInputError, ProbeResults, run_probes

__all__ = [
    "CanaryMonitor",
    "DivergenceCounts",
    "attach",
    "detect_divergence",
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
