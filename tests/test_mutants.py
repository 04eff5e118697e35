"""Mutation self-check: the state machines catch every mutant of the reference allocator by
a named invariant (never only by a crash), and the mutants between them fire every
invariant of the registry.

The checks run without shrinking (the time to detect is seconds; shrinking would cost
minutes) under one fixed master seed, so each test sees the same programs on every run.
`swa-canary selfcheck` runs the same mutants with shrinking and prints the minimal programs.
"""

from __future__ import annotations

import json

import pytest

from canary.probes import INVARIANTS
from properties.check import CheckReport, run_check
from properties.cli import main
from properties.mutants import MUTANTS, Mutant, mutant_factory
from properties.selfcheck import run_selfcheck

SEED = 1
BUDGET = 60.0
"""A cap, not a duration: every mutant is caught within a few seconds on a CI core."""


def check_mutant(name: str) -> CheckReport:
    return run_check(mutant_factory(name), budget=BUDGET, seed=SEED, shrink=False)


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught_by_an_invariant_it_breaks(name: str) -> None:
    report = check_mutant(name)
    finding = report.finding
    assert finding is not None, f"{name} escaped: {report.programs} programs, {report.steps} steps in {report.seconds:.0f}s"
    assert finding.invariant != "CRASH", f"{name} was caught only by a crash:\n{finding.explain()}"
    assert set(finding.invariants) & set(MUTANTS[name].breaks), (
        f"{name} breaks {MUTANTS[name].breaks} but was caught by {finding.invariants}:\n{finding.explain()}"
    )


def test_every_registered_invariant_is_fired_by_some_mutant() -> None:
    first: dict[str, list[str]] = {}
    anywhere: dict[str, list[str]] = {}
    for name in MUTANTS:
        finding = check_mutant(name).finding
        assert finding is not None, f"{name} escaped"
        first.setdefault(finding.invariant, []).append(name)
        for invariant in finding.invariants:
            anywhere.setdefault(invariant, []).append(name)
    missing = sorted(set(INVARIANTS) - set(anywhere))
    assert not missing, f"no mutant fires {missing}; fired first: {first}; fired anywhere: {anywhere}"


def test_mutants_are_single_bug_subclasses_of_the_reference() -> None:
    for name, mutant in MUTANTS.items():
        assert issubclass(mutant, Mutant), name
        assert mutant.breaks and set(mutant.breaks) <= set(INVARIANTS), f"{name} breaks {mutant.breaks}"
        source = mutant.__doc__ or ""
        assert "sglang" in source or "SPEC" in source, f"{name} names no source"
    with pytest.raises(KeyError, match="no mutant"):
        mutant_factory("no_such_bug")


def test_selfcheck_reports_caught_mutants_and_a_clean_reference(tmp_path) -> None:
    out = tmp_path / "selfcheck.json"
    code = main(["selfcheck", "--budget", "3", "--seed", str(SEED), "--mutant", "translate_off_by_one",
                 "--mutant", "available_uses_max", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0
    assert report["summary"]["kill_rate"] == 1.0 and report["summary"]["reference_clean"]
    assert [(m["name"], m["invariant"]) for m in report["mutants"]] == [
        ("translate_off_by_one", "XLAT"),
        ("available_uses_max", "AVAIL"),
    ]


def test_selfcheck_fails_when_a_mutant_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bare Mutant class is the reference itself: an equivalent mutant nothing can catch.
    monkeypatch.setitem(MUTANTS, "equivalent", Mutant)
    report = run_selfcheck(budget=2, seed=SEED, names=["equivalent"])
    assert report.escaped == ["equivalent"] and not report.passed
    assert "ESCAPED: equivalent" in report.explain()
    assert main(["selfcheck", "--budget", "2", "--seed", str(SEED), "--mutant", "equivalent"]) == 1
