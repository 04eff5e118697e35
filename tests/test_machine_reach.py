"""The machines reach every SPEC behaviour that random programs could miss (SPEC §1.2, §1.3):
each test runs one machine on the reference, briefly and deterministically, and asserts the
`hypothesis.event` its rules record only when the behaviour happened (properties/machines/reach.py).

The runs are small (a few dozen programs, seconds); a machine's events are computed once per
process. The last tests show the events can fail to appear: a contract that restricts a
pattern keeps its event away.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest

from properties.machines import machine_classes, reach
from properties.targets import SGLANG_CONTRACT, Target, reference_factory

EXAMPLES = 25
SEED = 0


@functools.cache
def events(machine: str, target: str = "reference") -> Counter:
    bound = Target("reference", reference_factory, SGLANG_CONTRACT) if target == "sglang contract" else target
    return reach.events_of(machine_classes(bound)[machine], EXAMPLES, SEED)


def missing(machine: str, wanted: set[str], target: str = "reference") -> list[str]:
    return sorted(wanted - set(events(machine, target)))


@pytest.mark.parametrize("machine", ["RequestMachinePS2", "RequestMachinePS4"])
def test_swa_tails_of_every_length_from_zero(machine: str) -> None:
    ps = machine_classes()[machine].page_size
    lengths = reach.every_label(reach.SWA_TAIL_LENGTH, [*range(ps + 1), "over a page"])
    assert not missing(machine, lengths)


@pytest.mark.parametrize("machine", ["RequestMachinePS2", "RequestMachinePS4"])
def test_swa_tails_at_every_page_offset(machine: str) -> None:
    ps = machine_classes()[machine].page_size
    assert not missing(machine, reach.every_label(reach.SWA_TAIL_OFFSET, range(ps)))


@pytest.mark.parametrize("machine", ["RequestMachinePS2", "RequestMachinePS4", "RequestMachinePS16"])
def test_free_free_swa_and_free_full_of_part_of_a_page(machine: str) -> None:
    assert not missing(machine, reach.every_label(reach.PART_OF_A_PAGE, ["free", "free_swa", "free_full"]))


@pytest.mark.parametrize("machine", ["SlotMachine", "RequestMachinePS1", "RequestMachinePS4", "RequestMachinePS64"])
def test_allocations_that_exactly_fill_each_pool(machine: str) -> None:
    assert not missing(machine, {reach.FILLED_FULL_POOL, reach.FILLED_SWA_POOL})


@pytest.mark.parametrize("machine", ["RequestMachinePS1", "RequestMachinePS4"])
def test_slots_allocated_and_freed_inside_one_free_group(machine: str) -> None:
    assert not missing(machine, {reach.ALLOC_AND_FREE_IN_ONE_GROUP})


@pytest.mark.parametrize("machine", ["SlotMachine", "RequestMachinePS4"])
def test_double_free_group_end(machine: str) -> None:
    assert not missing(machine, {reach.DOUBLE_GROUP_END})


@pytest.mark.parametrize("machine", ["SlotMachine", "RequestMachinePS4"])
def test_nested_free_group_begin_with_frees_pending(machine: str) -> None:
    assert not missing(machine, {reach.NESTED_BEGIN_WITH_PENDING_FREES})


@pytest.mark.parametrize("machine", ["SlotMachine", "RequestMachinePS4"])
def test_clear_inside_a_free_group(machine: str) -> None:
    assert not missing(machine, {reach.CLEAR_IN_GROUP})


def test_sglang_contract_keeps_misplaced_group_calls_and_unaligned_tails_away() -> None:
    """The events are not recorded regardless: under sglang's contract (groups paired, tails
    page aligned and non-empty) the machines make none of those calls."""
    restricted = {
        reach.DOUBLE_GROUP_END, reach.NESTED_BEGIN_WITH_PENDING_FREES, reach.labelled(reach.SWA_TAIL_LENGTH, 0)
    }
    seen = set(events("RequestMachinePS4", "sglang contract"))
    assert not restricted & seen
    assert reach.labelled(reach.SWA_TAIL_OFFSET, 0) in seen  # the aligned tails are still made
    assert not seen & reach.every_label(reach.SWA_TAIL_OFFSET, range(1, 4))
