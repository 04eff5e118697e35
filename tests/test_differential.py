"""Differential mode: one program drives two allocators, which must agree after every call."""

from __future__ import annotations

import pytest
import torch

from allocator import SWATokenToKVPoolAllocator, TokenToKVPoolAllocator
from allocator.errors import AllocatorError
from canary.invariants import InvariantViolation, Name
from canary.probes import AllocatorView
from properties.cli import EXIT_CLEAN, EXIT_USAGE, main
from properties.runners.check import run_check
from properties.runners.differential import DifferentialAllocator, differential_target
from properties.targets import (
    AllocatorConfig,
    Target,
    TargetCapabilities,
    TargetContract,
    reference_factory,
    resolve_target,
)

REFERENCE = resolve_target("reference")


class FreesToTheFront(TokenToKVPoolAllocator):
    """Without need_sort, freed slots go to the front of the free list (last freed, first
    reused) instead of the end."""

    def return_units(self, units: torch.Tensor) -> None:
        if self.need_sort:
            super().return_units(units)
        else:
            self.free_pages = torch.cat((units, self.free_pages))


def front_freeing_factory(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
    """The reference, except for the free-list order of its page-size-1 pools: they always hold
    the same free units as the reference's, so only a later returned value tells them apart."""
    allocator = reference_factory(config)
    if config.page_size == 1:
        for pool in (allocator.full_attn_allocator, allocator.swa_attn_allocator):
            pool.__class__ = FreesToTheFront
    return allocator


def small_allocator(checked: bool, size_swa: int = 8) -> SWATokenToKVPoolAllocator:
    return SWATokenToKVPoolAllocator(8, size_swa, 1, torch.float16, "cpu", checked=checked)


def test_reference_against_itself_finds_nothing() -> None:
    report = run_check(differential_target(REFERENCE, REFERENCE), budget=6, seed=3)
    assert report.finding is None, report.finding.explain()
    assert report.steps > 100


def test_a_free_order_difference_is_found_and_shrunk() -> None:
    target = differential_target(REFERENCE, Target("front-freeing", front_freeing_factory))
    report = run_check(target, budget=60, seed=1, machines=["SlotMachine"])
    finding = report.finding
    assert finding is not None, "the free-order difference was not found"
    assert finding.invariant == Name.DIFFERENTIAL, finding.explain()
    # The order shows once a freed slot is handed out again: alloc, free, alloc.
    assert "after alloc(" in finding.detail and "front-freeing" in finding.detail
    assert finding.program_steps <= 4, finding.program


def test_an_error_on_one_side_only_is_a_difference() -> None:
    both = DifferentialAllocator(
        small_allocator(checked=True), small_allocator(checked=False), ("checked", "unchecked")
    )
    with pytest.raises(InvariantViolation) as raised:
        both.free_full(torch.tensor([3]))  # slot 3 was never allocated
    assert raised.value.invariant == Name.DIFFERENTIAL
    assert "checked raised DoubleFreeError" in str(raised.value)
    assert "unchecked returned None" in str(raised.value)


def test_an_error_on_both_sides_is_the_first_sides_error() -> None:
    both = DifferentialAllocator(small_allocator(checked=True), small_allocator(checked=True), ("a", "b"))
    with pytest.raises(AllocatorError):
        both.free_full(torch.tensor([3]))


def test_a_state_difference_names_what_differs_on_each_side() -> None:
    with pytest.raises(InvariantViolation) as raised:
        DifferentialAllocator(small_allocator(True), small_allocator(True, size_swa=16), ("eight", "sixteen"))
    assert "sizes (full, SWA, available) (eight (8, 8, 8), sixteen (8, 16, 8))" in str(raised.value)
    assert "swa free list (eight [1, 2, 3, 4, 5, 6, 7, 8], sixteen [1, 2, 3, 4, 5, 6, 7, 8, ...] in any order)" in str(
        raised.value
    )


def test_each_side_gets_its_own_tensor_arguments() -> None:
    """A side that changes its argument in place must not change what the other side sees."""

    class ZeroesItsArgument(SWATokenToKVPoolAllocator):
        def free(self, free_index: torch.Tensor) -> None:
            super().free(free_index)
            free_index.zero_()

    both = DifferentialAllocator(
        ZeroesItsArgument(8, 8, 1, torch.float16, "cpu", checked=True), small_allocator(True), ("zeroes", "plain")
    )
    slots = both.alloc(3)
    both.free(slots)  # raises if the second side were handed [0, 0, 0]
    assert both.full_available_size() == 8


def test_the_contract_is_the_stricter_of_both() -> None:
    first = Target("first", reference_factory, TargetContract(no_backup_restore=True))
    second = Target("second", reference_factory, TargetContract(decode_capacity_prechecked=True))
    combined = differential_target(first, second)
    assert combined.contract.restrictions() == ["no_backup_restore", "decode_capacity_prechecked"]
    assert combined.name == "first vs second"


def test_the_cli_runs_a_differential_check(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check", "--target", "reference", "--against", "reference", "--budget", "2", "--seed", "1"]
    assert main(argv) == EXIT_CLEAN
    assert "against reference vs reference" in capsys.readouterr().out


def test_the_cli_rejects_an_unusable_against_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--against", "no_such_module_anywhere:factory", "--budget", "1"]) == EXIT_USAGE
    assert "no_such_module_anywhere" in capsys.readouterr().err


class WithoutAvailableSize(SWATokenToKVPoolAllocator):
    """The reference, with available_size() unimplemented (as in sglang 0.4.9.post6 – 0.5.x)."""

    def available_size(self) -> int:
        raise NotImplementedError("available_size")


def without_available_size(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
    return WithoutAvailableSize(config.size, config.size_swa, config.page_size, config.dtype, config.device)


@pytest.mark.parametrize("declared", [True, False])
def test_a_side_without_available_size_is_a_capability_only_when_declared(declared: bool) -> None:
    """A release that lacks available_size() and says so (its capabilities) is not asked for
    it on either side; one that lacks it and claims it differs from the reference there."""
    capabilities = TargetCapabilities(available_size=not declared)
    lacking = Target("lacking", without_available_size, TargetContract(), capabilities)
    allocator = differential_target(REFERENCE, lacking).factory(AllocatorConfig(16, 8, 1))
    allocator.alloc(4)
    if declared:
        with pytest.raises(NotImplementedError, match="not implemented by both of reference and lacking"):
            allocator.available_size()
        assert AllocatorView.of(allocator).available == 4  # min(full, swa) stands in, as for the release alone
    else:
        with pytest.raises(InvariantViolation, match="lacking raised NotImplementedError"):
            allocator.available_size()
