"""sglang 0.5.23's own allocator as a check target (installed by .ci/install-sglang; every test
here is skipped without it).

Under sglang's contract (SGLANG_CONTRACT: the calls its scheduler makes) the machines find no
violation, and sglang agrees with the reference call by call. Each restriction of that
contract hides one way sglang's allocator breaks SPEC §1 when called outside it: relaxing
that restriction alone finds it (README, "sglang 0.5.23 findings").
"""

from __future__ import annotations

import pytest
import torch

from canary.invariants import Name
from properties.runners.check import run_check
from properties.runners.differential import differential_target
from properties.targets import resolve_target, with_contract_changes

pytestmark = pytest.mark.sglang

SHORT_BUDGET = 20.0


@pytest.fixture(scope="module", autouse=True)
def sglang_allocator() -> None:
    from allocator.sglang_adapter import SglangUnavailableError, find_sglang_allocator_class

    try:
        find_sglang_allocator_class()
    except SglangUnavailableError:
        pytest.skip("sglang is not installed (.ci/install-sglang)")


def test_sglang_under_its_contract_shows_no_violation(swa_device: torch.device) -> None:
    report = run_check("sglang", swa_device.type, budget=SHORT_BUDGET, seed=1)
    assert report.finding is None, report.finding.explain()
    assert report.steps > 200


def test_sglang_agrees_with_the_reference_call_by_call(swa_device: torch.device) -> None:
    target = differential_target(resolve_target("reference"), resolve_target("sglang"))
    report = run_check(target, swa_device.type, budget=SHORT_BUDGET, seed=1)
    assert report.finding is None, report.finding.explain()
    assert report.steps > 200


@pytest.mark.parametrize(
    "restriction, machines, invariant",
    [
        # alloc_decode takes a full page, then finds no SWA page, returns None and keeps it.
        ("decode_capacity_prechecked", ["RequestMachinePS4"], Name.ATOMIC),
        # free() after a window slide hands SWA slot 0 to the SWA free list.
        ("free_held_swa_peers_only_at_ps1", ["SlotMachine"], Name.PAD),
        # A tail that starts mid-page puts its SWA slots at other offsets than its full slots.
        ("swa_tail_page_aligned", ["RequestMachinePS4"], Name.PAGE),
        # free_group_end with no group open does not raise.
        ("free_group_calls_paired", ["SlotMachine"], Name.CONTRACT),
    ],
)
def test_each_restriction_hides_a_deviation(
    restriction: str, machines: list[str], invariant: str, swa_device: torch.device
) -> None:
    target = with_contract_changes(resolve_target("sglang"), relax=[restriction])
    report = run_check(target, swa_device.type, budget=120, seed=4, machines=machines, shrink=False)
    assert report.finding is not None, f"relaxing {restriction} found nothing"
    assert invariant in report.finding.invariants, report.finding.explain()


def test_the_installed_release_is_found_and_its_capabilities_read() -> None:
    from allocator.sglang_adapter import find_sglang_allocator_class, make_sglang_allocator, sglang_capabilities

    capabilities = sglang_capabilities()
    cls = find_sglang_allocator_class()
    assert cls.__name__ == "SWATokenToKVPoolAllocator"
    assert capabilities.free_full == hasattr(cls, "free_full")
    allocator = make_sglang_allocator(8, 4, 1)
    entries = allocator.full_to_swa_index_mapping.numel()
    assert entries == (8 + 1 + 1 if capabilities.mapping_sentinel else 8 + 4 + 1)
    target = resolve_target("sglang")
    assert target.capabilities == capabilities
    assert with_contract_changes(target, relax=["all"]).capabilities == capabilities


def test_the_command_line_check_accepts_the_installed_release() -> None:
    from properties.cli import main

    # 0 or 1 (a finding) both mean the release was driven; 2 would be a refused target.
    assert main(["check", "--target", "sglang", "--budget", "1", "--seed", "1"]) in (0, 1)


def test_a_paged_allocation_runs_on_this_host_when_the_release_is_paged() -> None:
    from allocator.sglang_adapter import make_sglang_allocator, sglang_capabilities

    if not sglang_capabilities().paged:
        pytest.skip("the installed release has page size 1 only")
    allocator = make_sglang_allocator(size=8, size_swa=8, page_size=2)
    zero, three = torch.zeros(1, dtype=torch.int64), torch.full((1,), 3, dtype=torch.int64)
    assert allocator.alloc_extend(zero, zero, three, three, zero - 1, 3).tolist() == [2, 3, 4]
