"""Hypothesis settings profiles for the machines.

ci       deterministic, no example database, bounded: the same programs on every run.
dev      the default: a local example database, so failures replay first next time.
nightly  many long programs, for fuzzing campaigns.
The directory database writes each example to its own file, so concurrent pytest-xdist
workers and campaign processes can share one directory.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

DEFAULT_DATABASE = os.path.join(".hypothesis", "examples")
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=_SLOW_IS_FINE)
_LOCAL_DATABASE = DirectoryBasedExampleDatabase(DEFAULT_DATABASE)

settings.register_profile("ci", max_examples=40, stateful_step_count=40, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=60, stateful_step_count=50, database=_LOCAL_DATABASE, **_COMMON)
settings.register_profile("nightly", max_examples=5_000, stateful_step_count=100, database=_LOCAL_DATABASE, **_COMMON)

PROFILES = ("ci", "dev", "nightly")


def default_profile() -> str:
    """`ci` under CI (the CI environment variable), else `dev`."""
    return "ci" if os.environ.get("CI") else "dev"


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
