"""Exporting a finding: ids, literals, the standalone pytest file, atomic deduplicating writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from allocator import SWATokenToKVPoolAllocator
from canary.invariants import Name
from properties.runners.check import Finding
from properties.runners.export import (
    REPORT_NAME,
    call_source,
    export_finding,
    exported_findings,
    finding_id,
    render_indices,
    run_regression,
    write_finding_directory,
)
from properties.targets import AllocatorConfig, Target, reference_factory
from properties.targets.mutants import RestoreSkipsMapping, fixtures

REPO = Path(__file__).resolve().parents[1]


def build(kind: type[SWATokenToKVPoolAllocator]):
    def factory(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
        return kind(
            config.size, config.size_swa, config.page_size, config.dtype, config.device, need_sort=config.need_sort
        )

    return factory


def finding(invariant: str, config: dict, calls: list[dict]) -> Finding:
    return Finding(
        machine="SlotMachine",
        invariant=invariant,
        severity="FATAL",
        detail=f"{invariant} broke",
        program="state = SlotMachine()\nstate.teardown()",
        program_steps=len(calls),
        seed=7,
        seconds=1.0,
        calls={"config": config, "calls": calls},
        invariants=[invariant],
    )


restore_keeps_mapping = build(RestoreSkipsMapping)

SLOTS = {"size": 6, "size_swa": 4, "page_size": 1, "need_sort": False}
ALLOC_THEN_FREE = [{"call": "alloc", "args": [2]}, {"call": "free", "args": [[1, 2]]}]
PAGED = {"size": 16, "size_swa": 8, "page_size": 4, "need_sort": True}
PAGED_PROGRAM = [
    {"call": "alloc_extend", "args": [[0], [0], [6], [6], [-1], 6]},
    {"call": "backup_state", "args": [1]},
    {"call": "free_swa", "args": [[4, 5, 6, 7]]},
    {"call": "alloc_decode", "args": [[7], [7], [9]]},
    {"call": "restore_state", "args": [1]},
    {"call": "free", "args": [[4, 5, 6, 7, 8, 9]]},
]


def test_finding_id_is_the_identity_of_the_finding() -> None:
    stale = (Name.STALE, "free", "full slots that are not live still map to an SWA slot")
    assert finding_id(stale) == finding_id((Name.STALE, "free", str(stale[2])))
    assert finding_id(stale) != finding_id((Name.CONSERVE, *stale[1:]))
    assert finding_id(stale) != finding_id((Name.STALE, "free_swa", stale[2]))
    assert finding_id(stale) != finding_id((Name.STALE, "free", "another check"))
    assert finding_id(stale).startswith("stale-")


@pytest.mark.parametrize("values", [[], [5], [1, 2, 3], [1, 2, 3, 4], [9, 1, 2, 3, 4, 5, 7, 8, 40, 41, 42, 43, 44]])
def test_rendered_indices_evaluate_to_the_same_list(values: list[int]) -> None:
    assert eval(render_indices(values)) == values


def test_calls_render_tensors_on_the_device_and_lengths_on_cpu() -> None:
    assert call_source(PAGED_PROGRAM[0]) == "allocator.alloc_extend(t([0]), cpu([0]), t([6]), cpu([6]), t([-1]), 6)"
    assert call_source(PAGED_PROGRAM[1]) == "backup_1 = allocator.backup_state()"
    assert call_source(PAGED_PROGRAM[4]) == "allocator.restore_state(backup_1)"
    assert call_source(PAGED_PROGRAM[5]) == "allocator.free(t([*range(4, 10)]))"


def test_export_fails_on_the_broken_allocator_and_passes_on_the_reference(tmp_path: Path) -> None:
    target = Target("broken:KeepsMappingOnFreeSwa", build(fixtures.KeepsMappingOnFreeSwa))
    exported = export_finding(
        tmp_path, finding(Name.STALE, SLOTS, ALLOC_THEN_FREE), target, "cpu", "search", worker_seed=3
    )
    report = json.loads((exported.path / REPORT_NAME).read_text())
    assert report["fails_on_target"] and report["passes_on_reference"]
    assert "after #2 free" in report["target_failure"] and "mapping differs" in report["target_failure"]
    assert report["calls"]["calls"] == ALLOC_THEN_FREE and report["worker_seed"] == 3
    source = (exported.path / report["test"]).read_text()
    assert "import hypothesis" not in source and "from hypothesis" not in source
    assert run_regression(source, report["test"], reference_factory, "cpu") is None


def test_a_call_the_reference_rejects_must_raise_on_the_target(tmp_path: Path) -> None:
    calls = [{"call": "alloc", "args": [1]}, {"call": "free_group_end", "args": []}, {"call": "free", "args": [[1]]}]
    target = Target("silent-end", build(fixtures.GroupEndWithoutBeginIsSilent))
    exported = export_finding(tmp_path, finding(Name.CONTRACT, SLOTS, calls), target, "cpu", "search")
    source = (exported.path / exported.report["test"]).read_text()
    assert "with pytest.raises(Exception):\n        allocator.free_group_end()" in source
    assert "DID NOT RAISE" in exported.report["target_failure"]
    assert exported.report["passes_on_reference"]


def test_backup_restore_programs_replay_on_the_reference(tmp_path: Path) -> None:
    exported = export_finding(
        tmp_path, finding(Name.PAGE, PAGED, PAGED_PROGRAM), Target("reference", reference_factory), "cpu", "search"
    )
    assert exported.report["passes_on_reference"] and not exported.report["fails_on_target"]
    assert "pytest.raises" not in (exported.path / exported.report["test"]).read_text()


def test_the_exported_file_runs_under_pytest_with_swa_target(tmp_path: Path) -> None:
    exported = export_finding(
        tmp_path, finding(Name.PAGE, PAGED, PAGED_PROGRAM), Target("reference", reference_factory), "cpu", "search"
    )
    test_file = exported.path / exported.report["test"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(exported.path), str(test_file)
    ]
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    failing = subprocess.run(
        command, env={**env, "SWA_TARGET": "test_export:restore_keeps_mapping"}, capture_output=True, text=True
    )
    assert failing.returncode == 1, failing.stdout[-2000:]


def test_a_finding_is_written_once(tmp_path: Path) -> None:
    first = write_finding_directory(tmp_path, "stale-0123456789", {REPORT_NAME: '{"id": 1}', "test_x.py": "x = 1\n"})
    again = write_finding_directory(tmp_path, "stale-0123456789", {REPORT_NAME: '{"id": 2}'})
    assert first == tmp_path / "stale-0123456789" and again is None
    assert json.loads((first / REPORT_NAME).read_text()) == {"id": 1}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["stale-0123456789"]
    assert exported_findings(tmp_path) == [first]
