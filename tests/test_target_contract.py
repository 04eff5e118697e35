"""Target contracts: each restriction keeps the machines away from exactly one call pattern.

For every restriction there is an allocator that refuses that pattern (raises, or does not
raise where SPEC wants an error). Under the whole SPEC the check reports it; with the
restriction the check is clean, and the calls next to the pattern are still made.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

from allocator import SWATokenToKVPoolAllocator
from canary.invariants import Name
from properties.machines import machine_classes
from properties.runners.check import run_check
from properties.targets import (
    RESTRICTIONS,
    SGLANG_CONTRACT,
    SPEC_CONTRACT,
    AllocatorConfig,
    Target,
    TargetCapabilities,
    TargetContract,
    TargetError,
    as_target,
    build_allocator,
    check_target_builds,
    reference_factory,
    with_contract_changes,
)
from properties.targets.mutants import fixtures


class RefusedCall(AssertionError):
    """A call outside the allocator's own contract."""


class Refusing(SWATokenToKVPoolAllocator):
    """The reference allocator, refusing one call pattern; counts the calls next to it."""

    restriction = ""
    machines: list[str] = []
    reported_as = Name.CRASH
    nearby_calls: int | None = 0

    @classmethod
    def factory(cls) -> Callable[[AllocatorConfig], SWATokenToKVPoolAllocator]:
        def build(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
            return cls(
                config.size, config.size_swa, config.page_size, config.dtype, config.device,
                need_sort=config.need_sort, checked=True,
            )

        build.__name__ = cls.__name__
        return build

    def count_nearby(self) -> None:
        type(self).nearby_calls += 1


class RefusesFailingDecode(Refusing):
    """alloc_decode raises where it would fail: its callers check capacity first."""

    restriction = "decode_capacity_prechecked"
    machines = ["RequestMachinePS4"]

    def alloc_decode(self, seq_lens, seq_lens_cpu, last_loc):
        self.count_nearby()
        starting = int(((seq_lens_cpu - 1) % self.page_size == 0).sum())
        if starting * self.page_size > self.available_size():
            raise RefusedCall("alloc_decode without the capacity for it")
        return super().alloc_decode(seq_lens, seq_lens_cpu, last_loc)


class RefusesReleasedPeers(Refusing):
    """At page size 1, free and free_swa raise on a token whose SWA peer is already released."""

    restriction = "free_held_swa_peers_only_at_ps1"
    machines = ["SlotMachine", "RequestMachinePS1"]

    def free(self, free_index: torch.Tensor) -> None:
        self._refuse_released_peers(free_index)
        super().free(free_index)

    def free_swa(self, free_index: torch.Tensor) -> None:
        self._refuse_released_peers(free_index)
        super().free_swa(free_index)

    def free_full(self, free_index: torch.Tensor) -> None:
        if free_index.numel():
            self.count_nearby()  # the ending that replaces free(all) starts here
        super().free_full(free_index)

    def _refuse_released_peers(self, free_index: torch.Tensor) -> None:
        if self.page_size == 1 and bool((self.full_to_swa_index_mapping[free_index] == 0).any()):
            raise RefusedCall("free of a token whose SWA peer is already released")


class RefusesUnalignedTail(Refusing):
    """alloc_extend_swa_tail raises unless the tail is non-empty and starts on a page boundary
    at or after the prefix."""

    restriction = "swa_tail_page_aligned"
    machines = ["RequestMachinePS4"]

    def alloc_extend_swa_tail(
        self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens, swa_tail_len
    ):
        self.count_nearby()
        start = int(seq_lens_cpu[0]) - swa_tail_len
        if swa_tail_len < 1 or start % self.page_size or start < int(prefix_lens_cpu[0]):
            raise RefusedCall(f"SWA tail of {swa_tail_len} starting at {start}")
        return super().alloc_extend_swa_tail(
            prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens, swa_tail_len
        )


class RefusesBackup(Refusing):
    """backup_state raises."""

    restriction = "no_backup_restore"
    machines = ["SlotMachine"]

    nearby_calls = None  # nothing else is near backup_state: the rule is simply left out

    def backup_state(self):
        raise RefusedCall("backup_state")


class SilentUnmatchedGroupEnd(Refusing, fixtures.GroupEndWithoutBeginIsSilent):
    """free_group_end with no group open returns quietly instead of raising."""

    restriction = "free_group_calls_paired"
    machines = ["SlotMachine"]
    reported_as = Name.CONTRACT

    def free_group_end(self) -> None:
        if self.in_free_group:
            self.count_nearby()
        super().free_group_end()


REFUSING = [RefusesFailingDecode, RefusesReleasedPeers, RefusesUnalignedTail, RefusesBackup, SilentUnmatchedGroupEnd]


def test_every_restriction_has_a_refusing_allocator() -> None:
    assert sorted(cls.restriction for cls in REFUSING) == sorted(RESTRICTIONS)


@pytest.mark.parametrize("refusing", REFUSING, ids=lambda cls: cls.restriction)
def test_the_whole_spec_reaches_the_refused_pattern(refusing: type[Refusing]) -> None:
    target = Target(refusing.__name__, refusing.factory(), SPEC_CONTRACT)
    report = run_check(target, budget=120, seed=2, machines=refusing.machines, shrink=False)
    assert report.finding is not None, f"{refusing.restriction}: the pattern was never called"
    assert report.finding.invariant == refusing.reported_as, report.finding.explain()
    if refusing.reported_as == Name.CRASH:
        assert "RefusedCall" in report.finding.detail


@pytest.mark.parametrize("refusing", REFUSING, ids=lambda cls: cls.restriction)
def test_the_restriction_leaves_out_only_the_refused_pattern(refusing: type[Refusing]) -> None:
    counts_nearby = refusing.nearby_calls is not None
    if counts_nearby:
        refusing.nearby_calls = 0
    factory = refusing.factory()
    factory.contract = TargetContract(**{refusing.restriction: True})  # a factory may carry its contract
    report = run_check(factory, budget=5, seed=2, machines=refusing.machines)
    assert report.finding is None, report.finding.explain()
    if counts_nearby:
        assert refusing.nearby_calls > 0


def test_a_factory_without_a_contract_gets_the_whole_spec() -> None:
    def factory(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
        raise NotImplementedError

    assert as_target(factory).contract == SPEC_CONTRACT


def test_a_factory_contract_of_the_wrong_type_is_a_target_error() -> None:
    def factory(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
        raise NotImplementedError

    factory.contract = {"decode_capacity_prechecked": True}
    with pytest.raises(TargetError, match="not a TargetContract"):
        as_target(factory)


def test_relax_and_restrict_change_the_contract_and_say_so_in_the_name() -> None:
    sglang = Target("sglang", Refusing.factory(), SGLANG_CONTRACT)
    relaxed = with_contract_changes(sglang, relax=["all"], restrict=["no_backup_restore"])
    assert relaxed.contract == TargetContract(no_backup_restore=True)
    assert relaxed.name.startswith("sglang [") and "-decode_capacity_prechecked" in relaxed.name
    assert "+no_backup_restore" in relaxed.name
    assert with_contract_changes(sglang) is sglang
    with pytest.raises(TargetError, match="unknown contract restriction"):
        with_contract_changes(sglang, relax=["no_such_restriction"])


def test_relaxing_every_restriction_keeps_what_the_target_cannot_be_called_with() -> None:
    capabilities = TargetCapabilities(paged=False, free_full=False, backup_restore=False, mapping_sentinel=False)
    old = Target("old", Refusing.factory(), SGLANG_CONTRACT, capabilities)
    relaxed = with_contract_changes(old, relax=["all"])
    assert relaxed.contract == SPEC_CONTRACT
    assert relaxed.capabilities == capabilities
    assert set(machine_classes(relaxed)) == {"SlotMachine", "RequestMachinePS1"}
    assert all(machine.capabilities == capabilities for machine in machine_classes(relaxed).values())
    assert capabilities.missing() == ["paged", "free_full", "backup_restore", "mapping_sentinel"]
    assert capabilities.inapplicable_invariants() == ["SENTINEL"]


def test_a_factory_names_its_capabilities() -> None:
    def factory(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
        return reference_factory(config)

    factory.capabilities = TargetCapabilities(free_groups=False)
    assert as_target(factory).capabilities == TargetCapabilities(free_groups=False)
    factory.capabilities = {"free_groups": False}
    with pytest.raises(TargetError, match="not TargetCapabilities"):
        as_target(factory)


class WithoutFreeFullOrBackup(SWATokenToKVPoolAllocator):
    """An older release's interface: no free_full, no backup_state / restore_state."""

    free_full = None
    backup_state = None
    restore_state = None


def test_a_target_needs_only_the_methods_its_capabilities_call() -> None:
    def factory(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
        return WithoutFreeFullOrBackup(config.size, config.size_swa, config.page_size, config.dtype, config.device)

    with pytest.raises(TargetError, match="it has no free_full, backup_state, restore_state"):
        check_target_builds(Target("old", factory), "cpu")
    capabilities = TargetCapabilities(free_full=False, backup_restore=False)
    check_target_builds(Target("old", factory, SPEC_CONTRACT, capabilities), "cpu")
    with pytest.raises(TargetError, match="it has no free_full$"):
        check_target_builds(Target("old", factory, SPEC_CONTRACT, TargetCapabilities(backup_restore=False)), "cpu")


def test_without_the_capability_a_decode_that_cannot_fit_is_never_made() -> None:
    RefusesFailingDecode.nearby_calls = 0
    capabilities = TargetCapabilities(decode_beyond_capacity=False)
    target = Target("no-failing-decode", RefusesFailingDecode.factory(), SPEC_CONTRACT, capabilities)
    report = run_check(target, budget=5, seed=2, machines=RefusesFailingDecode.machines)
    assert report.finding is None, report.finding.explain()
    assert RefusesFailingDecode.nearby_calls > 0
    # --relax all keeps what the target cannot be called with.
    assert not with_contract_changes(target, relax=["all"]).capabilities.decode_beyond_capacity


def always_sorting(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
    """An allocator with no need_sort option that stages every free and merges sorted (sglang
    0.4.9.post6 - 0.5.0rc0)."""
    return build_allocator(SWATokenToKVPoolAllocator, dataclasses.replace(config, need_sort=True), checked=True)


def test_a_target_that_always_sorts_is_modelled_as_sorting() -> None:
    sorted_only = TargetCapabilities(need_sort=False, unsorted_frees=False)
    report = run_check(Target("sorts", always_sorting, SPEC_CONTRACT, sorted_only), budget=5, seed=1)
    assert report.finding is None, report.finding.explain()
    modelled_unsorted = Target("sorts", always_sorting, SPEC_CONTRACT, TargetCapabilities(need_sort=False))
    assert run_check(modelled_unsorted, budget=60, seed=1, shrink=False).finding is not None
