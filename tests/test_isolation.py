"""Targets in their own process (`SPEC@PYTHON`): the proxy reads back what the allocator
holds, findings are the same as in process, and a target that crashes or hangs becomes a
CRASH or HANG finding whose minimal program kills (or hangs) a fresh worker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from canary.probes import AllocatorView
from properties.cli import EXIT_CLEAN, EXIT_USAGE, main
from properties.machines.driver import AllocatorDriver
from properties.runners.check import CheckReport, run_check
from properties.runners.differential import differential_target
from properties.runners.export import export_finding
from properties.targets import (
    AllocatorConfig,
    TargetError,
    reference_factory,
    resolve_target,
)
from properties.targets.isolated import RemoteError, TargetCrashed, TargetHung

CONFIG = AllocatorConfig(32, 16, 4)
SLOTS = AllocatorConfig(8, 8, 1)
SEGFAULTS = "tests.isolation_targets:segfaults_on_second_alloc@"


@pytest.fixture(scope="module")
def segfault_report() -> CheckReport:
    """One check of the planted segfault, shrunk (each replay in a fresh worker)."""
    return run_check(SEGFAULTS, budget=20, seed=1, machines=["SlotMachine"], max_steps=6)


def t(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def same_view(isolated: object, local: object) -> None:
    remote, here = AllocatorView.of(isolated), AllocatorView.of(local)
    for field in (
        "page_size", "size_full", "size_swa", "full_available", "swa_available", "available", "in_free_group"
    ):
        assert getattr(remote, field) == getattr(here, field), field
    for field in ("mapping", "full_free", "swa_free"):
        assert getattr(remote, field).tolist() == getattr(here, field).tolist(), field


def test_the_proxy_reads_back_exactly_what_the_allocator_holds() -> None:
    isolated, local = resolve_target("reference@").factory(CONFIG), reference_factory(CONFIG)
    calls = [
        ("alloc_extend", (t(0), t(0), t(6), t(6), t(-1), 6)),
        ("free_group_begin", ()),
        ("free_swa", (t(4, 5, 6, 7),)),
        ("free_group_end", ()),
        ("alloc_decode", (t(7), t(7), t(9))),
    ]
    same_view(isolated, local)
    for method, args in calls:
        results = [getattr(side, method)(*args) for side in (isolated, local)]
        assert [None if r is None else r.tolist() for r in results[:1]] == [
            None if r is None else r.tolist() for r in results[1:]
        ]
        same_view(isolated, local)
    for some in (t(-1, 5, 9, 3), t(7, 7), t()):  # gathered from the read-back of every index
        translated = isolated.translate_loc_from_full_to_swa(some)
        assert translated.tolist() == local.translate_loc_from_full_to_swa(some).tolist()
    with pytest.raises(RemoteError, match=r"InvalidIndexError: kv_indices holds values in \[0, 40\]"):
        isolated.translate_loc_from_full_to_swa(t(0, 40))  # out of range: asked of the worker, which raises
    saved = isolated.backup_state(), local.backup_state()
    isolated.clear(), local.clear()
    isolated.restore_state(saved[0]), local.restore_state(saved[1])
    same_view(isolated, local)


def test_an_error_the_target_raises_comes_back_and_leaves_the_state_read_back() -> None:
    isolated = resolve_target("reference@").factory(SLOTS)
    before = AllocatorView.of(isolated).mapping.tolist()
    with pytest.raises(RemoteError, match="FreeGroupError: free_group_end without free_group_begin"):
        isolated.free_group_end()
    with pytest.raises(RemoteError, match="IndexIntegerError: need_size must be an int >= 0"):
        isolated.alloc(-1)
    with pytest.raises(TypeError):  # a builtin type comes back as itself
        isolated.alloc_extend(t(0))
    assert AllocatorView.of(isolated).mapping.tolist() == before
    assert isolated.alloc(4) is not None  # the session goes on


def test_isolated_reference_is_clean_and_runs_every_machine() -> None:
    report = run_check("reference@", budget=4, seed=5)
    assert report.finding is None, report.finding.explain()
    assert report.steps > 50


@pytest.mark.parametrize("mutant, invariant", [("free_keeps_mapping", "STALE"), ("translate_off_by_one", "XLAT")])
def test_a_mutant_in_its_own_process_breaks_what_it_breaks_in_process(mutant: str, invariant: str) -> None:
    report = run_check(f"mutant:{mutant}@", budget=30, seed=2, shrink=False)
    assert report.finding is not None and invariant in report.finding.invariants, report.finding


def test_a_segfault_is_a_crash_finding_whose_minimal_program_kills_a_fresh_worker(segfault_report: CheckReport) -> None:
    finding = segfault_report.finding
    assert finding is not None and finding.invariant == "CRASH", finding
    assert "SIGSEGV" in finding.detail
    assert [entry["call"] for entry in finding.calls["calls"]] == ["alloc", "alloc"]
    target = resolve_target(SEGFAULTS)
    driver = AllocatorDriver(target.factory(AllocatorConfig(**finding.calls["config"])), "cpu")
    with pytest.raises(TargetCrashed, match="SIGSEGV"):
        driver.replay(finding.calls["calls"])


def test_a_hang_is_a_hang_finding_with_a_minimal_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWA_CALL_TIMEOUT", "0.25")
    report = run_check(
        "tests.isolation_targets:hangs_on_second_alloc@", budget=20, seed=1, machines=["SlotMachine"], max_steps=6
    )
    finding = report.finding
    assert finding is not None and finding.invariant == "HANG", finding
    assert "did not return within 0.25s" in finding.detail
    assert [entry["call"] for entry in finding.calls["calls"]] == ["alloc", "alloc"]


def test_a_worker_that_exits_is_a_crash_and_the_next_program_gets_a_new_one() -> None:
    target = resolve_target("tests.isolation_targets:exits_on_second_alloc@")
    allocator = target.factory(SLOTS)
    allocator.alloc(4)
    with pytest.raises(TargetCrashed, match="exited with status 3 during alloc"):
        allocator.alloc(4)
    with pytest.raises(TargetCrashed, match="earlier call ended it"):
        allocator.free(t(4))
    assert target.factory(SLOTS).alloc(4) is not None


def test_a_hung_call_is_killed_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWA_CALL_TIMEOUT", "0.2")
    allocator = resolve_target("tests.isolation_targets:hangs_on_second_alloc@").factory(SLOTS)
    allocator.alloc(4)
    with pytest.raises(TargetHung, match="killed by SIGKILL"):
        allocator.alloc(4)


def test_a_crash_finding_exports_a_test_that_fails_on_the_target_and_passes_on_the_reference(
    tmp_path: Path, segfault_report: CheckReport
) -> None:
    exported = export_finding(tmp_path, segfault_report.finding, resolve_target(SEGFAULTS), "cpu", "search")
    assert exported.report["kind"] == "error"
    assert exported.report["fails_on_target"] and "SIGSEGV" in exported.report["target_failure"]
    assert exported.report["passes_on_reference"], exported.report["reference_failure"]


def test_a_differential_across_processes_finds_a_difference() -> None:
    target = differential_target(resolve_target("reference@"), resolve_target("mutant:token_free_goes_to_front@"))
    report = run_check(target, budget=30, seed=1, machines=["SlotMachine"], shrink=False)
    assert report.finding is not None and report.finding.invariant == "DIFFERENTIAL", report.finding


@pytest.mark.parametrize(
    "spec, message",
    [
        ("@", "names no target before '@'"),
        ("reference@/no/such/python", "no Python interpreter"),
        ("no_such_module:factory@", "cannot import target module 'no_such_module'"),
        ("mutant:no_such_mutant@", "no mutant 'no_such_mutant'"),
    ],
)
def test_an_unusable_isolated_target_is_a_target_error(spec: str, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        resolve_target(spec)


def test_the_command_line_isolates_and_exits_by_the_contract(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--isolate", "--budget", "2", "--seed", "1"]) == EXIT_CLEAN
    assert "against reference@ on cpu" in capsys.readouterr().out
    assert main(["check", "--target", f"reference@{sys.executable}", "--against", "reference", "--isolate",
                 "--budget", "2", "--seed", "1"]) == EXIT_CLEAN
    assert f"against reference@{sys.executable} vs reference@ on cpu" in capsys.readouterr().out
    assert main(["check", "--target", "reference@/no/such/python", "--budget", "1"]) == EXIT_USAGE
    assert main(["fuzz", "--in-process", "--isolate", "--duration", "1"]) == EXIT_USAGE
    assert "--in-process runs the target in the workers themselves" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_timeout:
        main(["check", "--isolate", "--call-timeout", "0", "--budget", "1"])
    assert bad_timeout.value.code == EXIT_USAGE
