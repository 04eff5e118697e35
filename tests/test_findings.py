"""Every distinct finding of a check: masking, FATAL first, --first, the JSON report, fuzz
deduplication, CAPACITY, and findings printed as plain allocator calls.

The planted target has two bugs of different depth: a one-step GUARD (free_group_end with no
group open returns quietly) and a five-step FATAL (a free group keeps only the last deferred
free of each pool: alloc, begin, free_swa, free, end loses the first one's SWA slot). Checks
run SlotMachine only, under fixed seeds, with budgets of seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, settings

from allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from allocator.free_list import FreeListAllocator
from canary.invariants import InvariantViolation, Name
from canary.probes import AllocatorView, run_probes
from properties.campaign.worker import run_machine
from properties.cli import main
from properties.machines import machine_classes
from properties.machines.masking import FindingMask, detail_shape, error_keys
from properties.machines.model import SWAModel
from properties.machines.step_checks import Expectation, check_step, observe
from properties.runners.check import CheckReport, Finding, Stats, run_check
from properties.runners.export import (
    SNIPPET_NAME,
    export_finding,
    exported_findings,
    finding_id,
)
from properties.runners.snippet import snippet_of
from properties.targets import (
    AllocatorConfig,
    Target,
    build_allocator,
    reference_factory,
)
from properties.targets.mutants import PoolMutant, mutant_factory

SLOTS = ["SlotMachine"]
BUDGET = 20.0
"""A cap: the planted bugs are found in seconds; the check spends the rest looking on."""


class _KeepsLastDeferredFree(FreeListAllocator):
    def release_units(self, units: torch.Tensor) -> None:
        if self.free_group is None or units.numel() == 0:
            return super().release_units(units)
        if self.allocated is not None:
            self.allocated[units] = False
        self.free_group[:] = [units]


class TwoPlantedBugs(PoolMutant):
    """Two bugs of different depth, for a check that must report both.

    GUARD, one step: free_group_end with no group open returns instead of raising (SPEC §1.3),
    which changes nothing. FATAL, five steps: inside a free group each pool keeps only the units
    of its last free call (SPEC §1.3: the end releases all it deferred), so the units of the
    earlier calls are never freed.
    Breaks CONTRACT (the stray end) and CONSERVE (the lost units).
    """

    breaks = ("CONTRACT", "CONSERVE")
    token_pool = type("TokenPoolKeepsLastDeferredFree", (_KeepsLastDeferredFree, TokenToKVPoolAllocator), {})
    paged_pool = type("PagedPoolKeepsLastDeferredFree", (_KeepsLastDeferredFree, PagedTokenToKVPoolAllocator), {})

    def free_group_end(self) -> None:
        if self.in_free_group:
            super().free_group_end()


def two_planted_bugs(config: AllocatorConfig) -> TwoPlantedBugs:
    return build_allocator(TwoPlantedBugs, config, checked=True)


PLANTED = "test_findings:two_planted_bugs"


@pytest.fixture(scope="module")
def every_finding() -> CheckReport:
    """One check of the planted target that goes on after each finding (shrinking on)."""
    return run_check(two_planted_bugs, budget=BUDGET, seed=3, machines=SLOTS, every_finding=True)


def by_invariant(report: CheckReport, invariant: Name) -> Finding:
    return next(finding for finding in report.findings if finding.invariant == invariant)


# ------------------------------------------------------------ every distinct finding
def test_a_short_guard_finding_does_not_hide_a_deeper_fatal_one(every_finding: CheckReport) -> None:
    report = every_finding
    found = [(finding.severity, finding.invariant) for finding in report.findings]
    assert found[0][0] == "FATAL" and Name.CONSERVE in report.findings[0].invariants, found
    assert ("GUARD", Name.CONTRACT) in found, found
    fatal, guard = report.findings[0], by_invariant(report, Name.CONTRACT)
    assert guard.program_steps == 1 and guard.call == "free_group_end", guard.explain()
    assert fatal.program_steps == 5 and fatal.call == "free_group_end", fatal.explain()
    assert guard.seconds < fatal.seconds <= fatal.reported_seconds
    assert not fatal.follows, "the FATAL program needs no masked step"
    assert len({finding.key for finding in report.findings}) == len(report.findings)


def test_the_json_report_lists_every_finding_and_keeps_the_worst_on_top(every_finding: CheckReport) -> None:
    report = json.loads(json.dumps(every_finding.to_json()))
    assert len(report["findings"]) == len(every_finding.findings) >= 2
    assert report["finding"] == report["findings"][0] and report["finding"]["severity"] == "FATAL"
    assert {"target", "device", "seed", "budget", "seconds", "programs", "steps", "runs"} <= set(report)
    assert all(finding["snippet"] and finding["calls"]["calls"] for finding in report["findings"])


def test_first_stops_at_the_first_finding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    code = main(["check", "--target", PLANTED, "--machine", "SlotMachine", "--budget", "30", "--seed", "3", "--first",
                 "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and len(report["findings"]) == 1, capsys.readouterr().out
    assert report["seconds"] < 30, "--first stopped at the finding, not at the budget"
    assert "Finding 1 of 1" in capsys.readouterr().out


def test_a_masked_finding_fails_no_step_and_others_still_do() -> None:
    machine = machine_classes(two_planted_bugs)["SlotMachine"]
    quick = settings(settings.get_profile("ci"), max_examples=300, derandomize=False, phases=[Phase.generate])
    unmasked = run_machine(machine, Stats(), 5, quick)
    assert isinstance(unmasked, InvariantViolation) and unmasked.invariant == Name.CONTRACT, unmasked
    guard = error_keys(unmasked.allocator_call, unmasked)
    assert guard[0][1] == "free_group_end" and "did not raise" in guard[0][2], guard
    masked = run_machine(machine, Stats(), 5, quick, mask=FindingMask(frozenset(guard)))
    assert isinstance(masked, InvariantViolation) and masked.severity.value == "FATAL", masked
    assert not set(guard) & set(error_keys(masked.allocator_call, masked))


def test_a_reference_check_that_goes_on_finds_nothing() -> None:
    report = run_check("reference", budget=3, seed=4, machines=SLOTS, every_finding=True)
    assert report.findings == [] and report.seconds >= 3


# ------------------------------------------------------------ identity and fuzz dedup
def test_the_identity_ignores_indices_numbers_and_clause_order() -> None:
    one, other = "swa pool: 3 free + 4 in use != 8 units: [1, 2]", "swa pool: 1 free + 0 in use != 2 units: [7]"
    assert detail_shape(one) == detail_shape(other)
    assert detail_shape("mapping differs at [1, [2, 3]]") == "mapping differs at [...]"
    assert detail_shape("a (2), then b (1)") == detail_shape("b (3), then a (1)")
    assert detail_shape("full pool: 1 free") != detail_shape("swa pool: 1 free")


def planted_finding(calls: list[dict], detail: str) -> Finding:
    """A CONSERVE finding of the planted target, as a worker would export it."""
    key = (Name.CONSERVE, "free_group_end", detail_shape(detail))
    finding = Finding(
        "SlotMachine", Name.CONSERVE, "FATAL", detail, "state = SlotMachine()\nstate.teardown()", len(calls), 1, 1.0,
        calls={"config": {"size": 4, "size_swa": 4, "page_size": 1, "need_sort": False}, "calls": calls},
        invariants=[Name.CONSERVE], call="free_group_end", keys=[key],
    )
    finding.snippet = snippet_of(finding, PLANTED_TARGET, "cpu")
    return finding


PLANTED_TARGET = Target(PLANTED, two_planted_bugs)
SHORT = [{"call": "alloc", "args": [2]}, {"call": "free_group_begin", "args": []}, {"call": "free_swa", "args": [[1]]},
         {"call": "free", "args": [[1, 2]]}, {"call": "free_group_end", "args": []}]


def test_fuzz_writes_one_folder_for_one_bug_found_by_two_programs(tmp_path: Path) -> None:
    longer = [{"call": "alloc", "args": [1]}, *SHORT[:2], {"call": "free_swa", "args": [[2]]},
              {"call": "free", "args": [[2, 3]]}, SHORT[-1]]
    one = planted_finding(SHORT, "FATAL CONSERVE: 1 swa pool: 3 free + 0 in use != 4 units: [1]")
    other = planted_finding(longer, "FATAL CONSERVE: 1 swa pool: 2 free + 1 in use != 4 units: [2]")
    first = export_finding(tmp_path, one, PLANTED_TARGET, "cpu", "search")
    second = export_finding(tmp_path, other, PLANTED_TARGET, "cpu", "search")
    assert first.identifier == second.identifier and second.path is None
    assert first.identifier == finding_id(one.key) and len(exported_findings(tmp_path)) == 1
    snippet = (tmp_path / first.identifier / SNIPPET_NAME).read_text()
    assert snippet == one.snippet and "a.free_group_end()" in snippet
    assert run_probes(AllocatorView.of(run_snippet(snippet)["a"])).read(), "the snippet shows the lost SWA slot"


# ------------------------------------------------------------ findings as allocator calls
def run_snippet(snippet: str, target: str | None = None) -> dict:
    """Execute a snippet (on another target, if named) and return its namespace."""
    if target is not None:
        snippet = snippet.replace(f"resolve_target({PLANTED!r})", f"resolve_target({target!r})")
    namespace: dict = {"__name__": "snippet"}
    exec(compile(snippet, "snippet.py", "exec"), namespace)
    return namespace


def test_the_snippet_runs_and_shows_the_bad_state_on_the_target_only(every_finding: CheckReport) -> None:
    fatal = every_finding.findings[0]
    calls = [line for line in fatal.snippet.splitlines() if line.lstrip().startswith("a.")]
    assert len(calls) == len(fatal.calls["calls"]), fatal.snippet
    assert f"resolve_target({PLANTED!r})" in fatal.snippet and fatal.snippet in fatal.explain()
    on_target = run_probes(AllocatorView.of(run_snippet(fatal.snippet)["a"])).read()
    assert {Name.CONSERVE, Name.SWA_LE_FULL} & {violation.invariant for violation in on_target}, on_target
    assert run_probes(AllocatorView.of(run_snippet(fatal.snippet, "reference")["a"])).read() == []


def test_the_snippet_comments_what_each_call_returned(every_finding: CheckReport) -> None:
    guard = by_invariant(every_finding, Name.CONTRACT)
    assert "a.free_group_end()" in guard.snippet and "# no error; the reference: raises" in guard.snippet
    run_snippet(guard.snippet)
    with pytest.raises(Exception, match="free_group_end"):
        run_snippet(guard.snippet, "reference")
    allocations = [line for line in every_finding.findings[0].snippet.splitlines() if line.startswith("a.alloc")]
    assert allocations and all("  # [" in line or "  # None" in line for line in allocations), allocations


# ------------------------------------------------------------ CAPACITY
def staged_then_reallocated(factory) -> list:
    """Fill both pools, free two slots (need_sort stages them), ask for two slots back: the
    violations of that last step."""
    allocator, model = factory(AllocatorConfig(4, 4, 1, need_sort=True)), SWAModel(4, 4, 1, need_sort=True)
    allocator.alloc(4), model.alloc(4)
    allocator.free(torch.tensor([1, 2])), model.free([1, 2])
    previous = observe(allocator, None).state
    expected = model.alloc(2)
    observed = observe(allocator, allocator.alloc(2))
    return check_step(observed, previous, model, Expectation("alloc", expected, True, {3, 4}), {1, 2, 3, 4})


def test_capacity_fires_alone_when_an_allocation_the_pools_can_serve_returns_none() -> None:
    violations = staged_then_reallocated(mutant_factory("precheck_ignores_staged"))
    assert [violation.invariant for violation in violations] == [Name.CAPACITY], violations
    assert violations[0].severity.value == "GUARD" and violations[0].indices == [1, 2]


def test_capacity_stays_quiet_on_the_reference() -> None:
    assert staged_then_reallocated(reference_factory) == []


def test_a_check_reports_a_refusing_allocator_as_capacity_not_nodup() -> None:
    report = run_check(mutant_factory("precheck_ignores_staged"), budget=30, seed=2, machines=SLOTS, shrink=False)
    assert report.finding is not None and report.finding.invariants == [Name.CAPACITY], report.finding
