"""The per-step check reads only what a step changed; the end of a program reads the whole
state. Each part must fire on a broken allocator and stay quiet on the reference."""

from __future__ import annotations

import pytest
import torch

from canary.invariants import InvariantViolation, Name
from properties.machines import machine_classes
from properties.machines.incremental import PROBED_ENTRIES_PER_PROGRAM
from properties.runners.check import run_check
from properties.targets import AllocatorConfig, Target, reference_factory


def slot_machine(factory=reference_factory):
    """A SlotMachine on `factory`, driven by hand (outside Hypothesis)."""
    machine = machine_classes(Target("under-test", factory))["SlotMachine"]()
    machine.setup(size=8, size_swa=8, need_sort=False)
    machine.allocator_matches_model()
    return machine


def test_a_correct_program_passes_every_step_and_its_end() -> None:
    machine = slot_machine()
    handle = machine.alloc(need=3)
    machine.allocator_matches_model()
    machine.free_swa(handle=handle, count=2)
    machine.allocator_matches_model()
    machine.teardown()


def test_a_write_no_call_pointed_at_is_caught_at_the_end_of_the_program() -> None:
    machine = slot_machine()
    machine.alloc(need=2)
    machine.allocator_matches_model()
    machine.allocator.full_to_swa_index_mapping[6] = 5  # slot 6 was never allocated
    machine.allocator_matches_model()  # the step touched slots 1 and 2 only
    with pytest.raises(InvariantViolation) as raised:
        machine.teardown()
    assert Name.STALE in {violation.invariant for violation in raised.value.violations}


def test_a_free_list_out_of_order_is_caught_at_the_step_that_changed_it() -> None:
    machine = slot_machine()
    handle = machine.alloc(need=2)
    machine.allocator_matches_model()
    machine.finish(handle=handle, ending="free")
    pool = machine.allocator.full_attn_allocator
    pool.free_pages = torch.cat((pool.free_pages[-2:], pool.free_pages[:-2]))  # freed units in front
    with pytest.raises(InvariantViolation) as raised:
        machine.allocator_matches_model()
    assert [violation.invariant for violation in raised.value.violations] == [Name.CONTRACT]


def test_the_end_of_a_program_is_not_checked_after_a_failing_step() -> None:
    machine = slot_machine()
    machine.alloc(need=2)
    machine.allocator.full_to_swa_index_mapping[1] = 0
    with pytest.raises(InvariantViolation):
        machine.allocator_matches_model()
    machine.teardown()  # the step's violation is the finding, not a second one at the end


class WritesPastTheFreedPage(type(reference_factory(AllocatorConfig(8, 8, 1)))):
    """free_swa() also clears the SWA peer of the slot after the last one it frees: a write
    where the call did not point."""

    def free_swa(self, free_index: torch.Tensor) -> None:
        super().free_swa(free_index)
        if free_index.numel():
            after = int(free_index.max()) + 1
            if after < self.size:
                self.full_to_swa_index_mapping[after] = 0


def test_a_check_finds_a_bug_that_writes_where_no_call_pointed() -> None:
    def factory(config: AllocatorConfig) -> WritesPastTheFreedPage:
        return WritesPastTheFreedPage(config.size, config.size_swa, config.page_size, torch.float16, config.device)

    report = run_check(Target("writes-past", factory), budget=60, seed=3, machines=["SlotMachine"], shrink=False)
    assert report.finding is not None
    assert report.finding.invariant != Name.CRASH, report.finding.explain()


def test_probes_run_at_the_end_of_every_small_program() -> None:
    machine = slot_machine()
    assert machine.model.mapping_len <= PROBED_ENTRIES_PER_PROGRAM
    machine.allocator.full_attn_allocator.free_pages[0] = 0  # the padding unit on the free list
    with pytest.raises(InvariantViolation) as raised:
        machine.teardown()
    assert Name.PAD in {violation.invariant for violation in raised.value.violations}
