"""What the machines reach: the `hypothesis.event` each one records for a SPEC behaviour that
random programs could otherwise miss, and how to count them over a run.

An event is recorded only when its behaviour happened in the step (the call was made, and the
model says it had that effect), so the counts are evidence of reach, not of intent.
tests/test_machine_reach.py runs each machine briefly and asserts every event it owns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from hypothesis import Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test
from hypothesis.statistics import collector

from properties.settings import PROFILES

SWA_TAIL_LENGTH = "swa tail length"
"""alloc_extend_swa_tail's tail, in tokens (followed by the length up to a page, else 'over a page')."""
SWA_TAIL_OFFSET = "swa tail starts at page offset"
"""Where in its page the tail starts (followed by the offset)."""
PART_OF_A_PAGE = "named part of a page's tokens"
"""A free, free_swa or free_full (followed by which) that left out some of a live page's tokens."""
FILLED_FULL_POOL = "allocation exactly filled the full pool"
FILLED_SWA_POOL = "allocation exactly filled the SWA pool"
ALLOC_AND_FREE_IN_ONE_GROUP = "free inside a free group of slots allocated in it"
DOUBLE_GROUP_END = "free_group_end right after free_group_end"
NESTED_BEGIN_WITH_PENDING_FREES = "nested free_group_begin with frees pending"
CLEAR_IN_GROUP = "clear inside a free group"

HYPOTHESIS_EVENT_PREFIXES = ("Retried draw from", "Aborted test because", "gave up because")
"""Hypothesis's own events (they name rules by memory address): not coverage of the machines."""


def count_events(statistics: dict, into: Counter) -> None:
    """Add the machines' events of every test case in Hypothesis's statistics of one run.

    Args:
        statistics: what `hypothesis.statistics.collector` hands over after a run.
        into: counts per event, updated in place (each test case counts an event once).
    """
    for phase in statistics.values():
        if isinstance(phase, dict):
            for case in phase.get("test-cases", ()):
                into.update(
                    event for event in case.get("events", ()) if not event.startswith(HYPOTHESIS_EVENT_PREFIXES)
                )


def events_of(machine: type[RuleBasedStateMachine], examples: int, seed: int = 0) -> Counter:
    """The events of one short deterministic run of `machine` (generation only, no shrinking).

    Args:
        machine: a machine class, bound to its target (machine_classes).
        examples: programs to run.
        seed: Hypothesis seed of the run.

    Returns:
        Event -> number of programs that recorded it.
    """
    events: Counter = Counter()
    run = settings(PROFILES["ci"], max_examples=examples, phases=[Phase.generate], database=None)
    # Hypothesis types the statistics hook by its default, None.
    with collector.with_value(lambda statistics: count_events(statistics, events)):  # type: ignore[arg-type]
        run_state_machine_as_test(hypothesis_seed(seed)(machine), settings=run)
    return events


def labelled(event: str, detail: object) -> str:
    """`event` with a detail (one event per detail: Hypothesis keeps one payload per event
    and test case, so a detail that varies within a program must be part of the name)."""
    return f"{event} {detail}"


def every_label(event: str, details: Iterable[object]) -> set[str]:
    """`labelled(event, detail)` for each detail."""
    return {labelled(event, detail) for detail in details}
