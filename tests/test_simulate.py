"""The serving simulator: a clean run reports nothing, each injected fault is reported by the
canary (and a broken allocator is caught without any injection), and the command line says so."""

from __future__ import annotations

import io
import logging

import pytest
import torch

import canary.simulate as simulate_module
from canary.invariants import Name
from canary.simulate import (
    INJECTIONS,
    Progress,
    SimulationConfig,
    SimulationConfigError,
    Simulator,
)
from properties.cli import main
from properties.targets.mutants import fixtures

SMALL = dict(
    size=4096, size_swa=2048, window=64, max_running=12, prefill_budget=256, prompt_tokens=(8, 200),
    output_tokens=(8, 120), every=4,
)


def run(**options) -> Simulator:
    simulator = Simulator(SimulationConfig(**{**SMALL, **options}), logger=logging.getLogger("swa_canary.test.sim"))
    simulator.run()
    return simulator


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_clean_run_serves_requests_and_reports_nothing(page_size: int) -> None:
    simulator = run(steps=300, page_size=page_size, seed=11, arrival_rate=1.0, max_running=32)
    report = simulator.report
    assert report.passed and report.records == []
    assert report.finished > 0 and report.steps == 300
    assert report.allocation_failures > 0  # the pools ran full: requests had to wait
    assert report.checks == 300 // 4
    totals = simulator.monitor.stats().divergence
    assert totals["live"] > 0 and totals["evicted"] > 0
    assert totals["window_missing"] == totals["leaked"] == totals["shared"] == 0


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("invariant", sorted(INJECTIONS))
def test_each_injected_fault_is_reported(invariant: str, page_size: int) -> None:
    report = run(steps=160, page_size=page_size, inject=invariant, seed=7).report
    assert report.injection is not None and report.injection.invariant == invariant
    assert report.passed
    assert report.detection.invariant == invariant
    # On the CPU a check is read at once, so the report comes at the next check.
    assert 0 <= report.detection.reported_step - report.injection.step < 4
    assert report.steps == report.detection.reported_step  # the run stops there
    text = "\n".join(report.summary())
    assert f"injected {invariant} at step {report.injection.step}" in text and "steps after the injection" in text


def test_a_broken_allocator_is_caught_without_injection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulate_module, "SWATokenToKVPoolAllocator", fixtures.LeaksSwaOnFreeSwa)
    report = run(steps=200, seed=3).report
    assert not report.passed
    assert {record.invariant for record in report.records} == {Name.SWA_LE_FULL}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"size": 4098, "page_size": 4}, "size=4098 is not a multiple of page_size=4"),
        ({"size": 256}, "cannot hold one request"),
        ({"size_swa": 256}, "size_swa=256 must exceed"),
        ({"inject": "ATOMIC"}, "unknown injection 'ATOMIC'"),
        ({"inject": "PAD", "steps": 3}, "needs steps >= every"),
        ({"inject": "PAD", "canary": "off"}, "needs the canary on"),
        ({"inject": "WINDOW", "window": 5}, "WINDOW injection needs window >= every \\+ 2"),
        ({"device": "tpu"}, "device must be cpu or cuda"),
        ({"canary": "loud"}, "canary must be one of"),
        ({"arrival_rate": -1.0}, "arrival_rate must be a finite number"),
        ({"prompt_tokens": (10, 5)}, "prompt_tokens must be a range"),
    ],
)
def test_bad_configurations_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(SimulationConfigError, match=message):
        Simulator(SimulationConfig(**{**SMALL, "steps": 100, **options}))


def test_the_command_reports_the_injection_and_exits_clean(capsys: pytest.CaptureFixture) -> None:
    argv = ["simulate", "--steps", "120", "--size", "16384", "--size-swa", "4096", "--window", "128", "--every", "8",
            "--inject", "NODUP", "--seed", "4"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "FATAL NODUP" in captured.out and "steps after the injection" in captured.out
    assert 'SWA_CANARY {"schema":1,"invariant":"NODUP"' in captured.err  # the record, as logged
    assert "step " in captured.err  # progress


def test_the_command_rejects_a_bad_configuration(capsys: pytest.CaptureFixture) -> None:
    assert main(["simulate", "--size-swa", "64"]) == 2
    assert "size_swa=64 must exceed" in capsys.readouterr().err


def test_a_missed_injection_exits_with_one(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(INJECTIONS, Name.PAD, lambda simulator: "did nothing")
    argv = ["simulate", "--steps", "40", "--size", "16384", "--size-swa", "4096", "--window", "128", "--every", "8",
            "--inject", "PAD", "--seed", "1"]
    assert main(argv) == 1
    assert "NOT REPORTED" in capsys.readouterr().out


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_updates_one_line_on_a_terminal_and_prints_lines_elsewhere() -> None:
    terminal = FakeTerminal()
    progress = Progress(terminal)
    progress.update("step 1", force=True)
    progress.message("a record")
    progress.update("step 2", force=True)
    progress.close()
    assert terminal.getvalue() == "\rstep 1\x1b[K\r\x1b[Ka record\nstep 1\rstep 2\x1b[K\n"

    log = io.StringIO()
    progress = Progress(log, interval=3600)
    for step in range(100):
        progress.update(f"step {step}")
    progress.message("a record")
    progress.update("done", force=True)
    progress.close()
    assert log.getvalue() == "step 0\na record\ndone\n"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("invariant", sorted(INJECTIONS))
def test_each_injected_fault_is_reported_on_cuda(invariant: str) -> None:
    report = run(steps=160, page_size=16, size=8192, size_swa=4096, inject=invariant, seed=7, device="cuda").report
    assert report.passed and report.detection.invariant == invariant
    # The read-back may wait for the check after (double buffering), never longer.
    assert report.detection.reported_step - report.injection.step < 2 * 4 + 1
