"""Hypothesis settings profiles for the machines.

ci       deterministic, no example database, bounded: the same programs on every run.
dev      the default: a local example database, so failures replay first next time.
nightly  many long programs, for fuzzing campaigns.
The profiles are plain settings objects that our runners and the pytest plugin hand to the
machines; none is registered or loaded globally, so a project's own Hypothesis tests keep
their own profile (`register_profiles` does that for this repository's tests only).
The directory database writes each example to its own file, so concurrent pytest-xdist
workers and campaign processes can share one directory.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

DEFAULT_DATABASE = os.path.join(".hypothesis", "examples")
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

# Built on Hypothesis's own defaults, not on whatever profile the importing process loaded.
_BASE = settings(settings.get_profile("default"), deadline=None, print_blob=True, suppress_health_check=_SLOW_IS_FINE)
_LOCAL_DATABASE = DirectoryBasedExampleDatabase(DEFAULT_DATABASE)

PROFILES: dict[str, settings] = {
    "ci": settings(_BASE, max_examples=40, stateful_step_count=40, derandomize=True, database=None),
    "dev": settings(_BASE, max_examples=60, stateful_step_count=50, database=_LOCAL_DATABASE),
    "nightly": settings(_BASE, max_examples=5_000, stateful_step_count=100, database=_LOCAL_DATABASE),
}


def default_profile() -> str:
    """`ci` under CI (the CI environment variable), else `dev`."""
    return "ci" if os.environ.get("CI") else "dev"


def machine_settings(profile: str | None = None) -> settings:
    """The settings the machines run under.

    Args:
        profile: one of PROFILES; any other name, or None, means `default_profile()` (a name
            given to --hypothesis-profile may be a project's own profile, not one of ours).

    Returns:
        That profile's settings object.
    """
    return PROFILES[profile if profile in PROFILES else default_profile()]


def register_profiles() -> None:
    """Register our profiles under their names with Hypothesis and load the default one, for a
    test suite whose every Hypothesis test should run under them (this repository's own)."""
    for name, profile in PROFILES.items():
        settings.register_profile(name, profile)
    settings.load_profile(default_profile())


def prepare_process() -> None:
    """Tune a process that runs the machines: torch on one thread, and the objects alive
    after import and set-up frozen out of garbage collection.

    The probes and the allocators work on small tensors, where torch's intra-op threads only
    contend (55x slower probes at 16K tokens on a loaded 2-core machine); a campaign gets its
    parallelism from processes instead. Hypothesis makes garbage at every step, and each full
    collection otherwise walks the ~170K objects that importing torch and Hypothesis leaves,
    none of which ever becomes garbage.
    """
    import gc

    import torch

    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
