"""Mutation self-check: the state machines catch every mutant of the reference allocator by
a named invariant (never only by a crash), a differential check against the reference
catches each one too, and the mutants between them fire every invariant of the registry.

The checks run without shrinking (the time to detect is seconds; shrinking would cost
minutes) under one fixed master seed, so each test sees the same programs on every run, and
a check's report is computed once per process. `swa-canary selfcheck` runs the same mutants
with shrinking and prints the minimal programs.
"""

from __future__ import annotations

import functools
import json

import pytest

from canary.invariants import INVARIANTS, Checker, Name
from properties.cli import main
from properties.runners.check import CheckReport, run_check
from properties.runners.differential import differential_target
from properties.targets import as_target
from properties.targets.mutants import MUTANTS, Mutant, mutant_factory

SEED = 2
BUDGET = 60.0
"""A cap, not a duration: every mutant is caught within a few seconds on a CI core."""


@functools.cache
def check_mutant(name: str, differential: bool = False) -> CheckReport:
    """The mutant checked alone, or (differential) the reference checked call by call against it."""
    target = as_target(mutant_factory(name))
    if differential:
        target = differential_target(as_target("reference"), target)
    return run_check(target, budget=BUDGET, seed=SEED, shrink=False)


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught_by_an_invariant_it_breaks(name: str) -> None:
    report = check_mutant(name)
    finding = report.finding
    assert finding is not None, (
        f"{name} escaped: {report.programs} programs, {report.steps} steps in {report.seconds:.0f}s"
    )
    assert finding.invariant != Name.CRASH, f"{name} was caught only by a crash:\n{finding.explain()}"
    assert set(finding.invariants) & set(MUTANTS[name].breaks), (
        f"{name} breaks {MUTANTS[name].breaks} but was caught by {finding.invariants}:\n{finding.explain()}"
    )


@pytest.mark.parametrize("name", list(MUTANTS))
def test_differential_check_against_the_reference_catches_the_mutant(name: str) -> None:
    # The reference is the side the machines' own checks read: only the comparison sees the bug.
    finding = check_mutant(name, differential=True).finding
    assert finding is not None, f"the differential check missed {name}"
    assert finding.invariant == Name.DIFFERENTIAL, finding.explain()


def test_every_registered_invariant_is_fired_by_some_mutant() -> None:
    first: dict[str, list[str]] = {}
    anywhere: dict[str, list[str]] = {}
    for name in MUTANTS:
        for differential in (False, True):
            finding = check_mutant(name, differential).finding
            assert finding is not None, f"{name} escaped{' the differential check' if differential else ''}"
            first.setdefault(finding.invariant, []).append(name)
            for invariant in finding.invariants:
                anywhere.setdefault(invariant, []).append(name)
    fired_by_a_check = {name for name, invariant in INVARIANTS.items() if invariant.checker is not Checker.RUNNER}
    missing = sorted(fired_by_a_check - set(anywhere))
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
        ("translate_off_by_one", Name.XLAT),
        ("available_uses_max", Name.AVAIL),
    ]


def test_selfcheck_fails_when_a_mutant_escapes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path
) -> None:
    # The bare Mutant class is the reference itself: an equivalent mutant nothing can catch.
    monkeypatch.setitem(MUTANTS, "equivalent", Mutant)
    out = tmp_path / "selfcheck.json"
    code = main(["selfcheck", "--budget", "1", "--seed", str(SEED), "--mutant", "equivalent", "--json", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert code == 1
    assert summary["escaped"] == ["equivalent"] and summary["kill_rate"] == 0.0 and summary["reference_clean"]
    assert "ESCAPED: equivalent" in capsys.readouterr().out
