"""The registry: every name is registered once, with a severity, a description and something
that can fire it (a probe, a model check, or the runner)."""

from __future__ import annotations

import pytest
import torch

from allocator import SWATokenToKVPoolAllocator
from canary.invariants import INVARIANTS, Checker, Invariant, Name, Severity, registry
from canary.probes import AllocatorView, run_probes
from canary.probes.plan import CHECK_DETAILS
from properties.runners.check import finding_from, run_check
from properties.targets import AllocatorConfig, Target
from properties.targets.isolated import TargetCrashed, TargetHung
from properties.targets.mutants import MUTANTS


def test_a_name_registered_twice_is_rejected() -> None:
    first = Invariant(Name.PAD, Severity.FATAL, "slot 0 is never handed out", Checker.PROBE)
    again = Invariant(Name.PAD, Severity.GUARD, "another meaning", Checker.MODEL)
    with pytest.raises(ValueError, match="PAD is registered twice"):
        registry([first, again])


@pytest.mark.parametrize("name", list(Name))
def test_every_name_has_one_entry_with_a_severity_and_a_description(name: Name) -> None:
    invariant = INVARIANTS[name]
    assert invariant.name is name
    assert isinstance(invariant.severity, Severity) and isinstance(invariant.checker, Checker)
    assert invariant.description.strip()


def test_names_are_the_bare_strings_of_reports() -> None:
    assert Name.SWA_LE_FULL == "SWA_LE_FULL" and f"{Name.SWA_LE_FULL}" == str(Name.SWA_LE_FULL) == "SWA_LE_FULL"
    assert INVARIANTS["NODUP"] is INVARIANTS[Name.NODUP]


@pytest.mark.parametrize("name", [n for n, inv in INVARIANTS.items() if inv.checker is Checker.PROBE])
def test_every_probe_invariant_has_a_probe(name: Name) -> None:
    # That each probe fires on a broken allocator: tests/test_probes.py.
    allocator = SWATokenToKVPoolAllocator(16, 8, 1, torch.float16, "cpu")
    assert CHECK_DETAILS[name]
    assert run_probes(AllocatorView.of(allocator), [name]).names == (name,)


@pytest.mark.parametrize("name", [n for n, inv in INVARIANTS.items() if inv.checker is not Checker.RUNNER])
def test_every_probe_and_model_invariant_is_broken_by_a_mutant(name: Name) -> None:
    # That the machines report each mutant by what it breaks, and that a differential check
    # against the reference reports every mutant as DIFFERENTIAL: tests/test_mutants.py.
    assert name is Name.DIFFERENTIAL or any(name in mutant.breaks for mutant in MUTANTS.values())


class RaisesOnFree(SWATokenToKVPoolAllocator):
    def free(self, free_index: torch.Tensor) -> None:
        raise RuntimeError("free is broken")


def raises_on_free(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
    return RaisesOnFree(config.size, config.size_swa, config.page_size, config.dtype, config.device)


def test_the_runner_reports_a_raising_target_as_crash() -> None:
    report = run_check(
        Target("raises-on-free", raises_on_free), budget=30, seed=0, machines=["SlotMachine"], shrink=False
    )
    assert report.finding is not None and report.finding.invariant is Name.CRASH
    assert report.finding.severity == INVARIANTS[Name.CRASH].severity.value
    assert "free is broken" in report.finding.detail


@pytest.mark.parametrize(
    ("error", "name"),
    [(RuntimeError("free is broken"), Name.CRASH), (TargetCrashed("killed by SIGSEGV"), Name.CRASH),
     (TargetHung("did not return within 0.25s"), Name.HANG)],
)
def test_the_runner_names_every_way_a_call_can_end_badly(error: Exception, name: Name) -> None:
    # A real hanging and a real crashing target: tests/test_isolation.py.
    finding = finding_from("SlotMachine", error, run_seed=0, seconds=0.0)
    assert finding.invariant is name and finding.severity == INVARIANTS[name].severity.value
    assert {n for n, inv in INVARIANTS.items() if inv.checker is Checker.RUNNER} == {Name.CRASH, Name.HANG}
