"""Harness throughput: steps per second of one worker, and the harness overhead ratio.

For each machine it runs Hypothesis programs for a while with every check on, keeping each
program's allocator-call log; then it replays exactly those calls on a bare allocator built
by the same factory. The ratio is (harness seconds per step) / (bare seconds per call), both
measured in this one run.

    python -m bench.bench_harness [--seconds 20] [--device cpu|cuda] [--machines RequestMachinePS1 ...]
"""

from __future__ import annotations

import argparse
import time

import torch
from hypothesis import seed as hypothesis_seed
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

import properties.settings  # noqa: F401  registers the profiles
from allocator import AllocatorError
from properties.machines import machine_classes
from properties.machines.driver import AllocatorDriver
from properties.runners.check import Stats, bind_stats
from properties.targets import AllocatorConfig, reference_factory


def run_harness(machine: type, seconds: float) -> tuple[int, float, list[dict]]:
    """Steps taken, seconds spent, and the call logs of every program."""
    logs: list[dict] = []

    class Recording(machine):
        def teardown(self) -> None:
            if self.allocator is not None:
                logs.append({"config": self.model.config(), "calls": list(self.driver.log)})

    stats = Stats()
    bound = bind_stats(Recording, stats)
    run_settings = settings(settings.get_profile("ci"), max_examples=10, derandomize=False, database=None)
    started = time.perf_counter()
    run = 0
    while time.perf_counter() - started < seconds:
        run += 1
        run_state_machine_as_test(hypothesis_seed(run)(bound), settings=run_settings)
    return stats.steps, time.perf_counter() - started, logs


def replay_bare(logs: list[dict], device: str) -> tuple[int, float]:
    """Replay every logged call on a fresh allocator per program; calls made and seconds spent."""
    calls, spent = 0, 0.0
    for program in logs:
        config = AllocatorConfig(device=device, **program["config"])
        driver = AllocatorDriver(reference_factory(config), device)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for entry in program["calls"]:
            try:  # programs also probe misuse, which the allocator must reject
                driver.call(entry["call"], *entry["args"])
            except AllocatorError:
                pass
        if device == "cuda":
            torch.cuda.synchronize()
        spent += time.perf_counter() - started
        calls += len(program["calls"])
    return calls, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--machines", nargs="*", default=["RequestMachinePS1", "RequestMachinePS16", "SlotMachine"])
    args = parser.parse_args()
    classes = machine_classes("reference", args.device)
    print("| machine | device | steps | steps/s | harness µs/step | bare µs/call | overhead ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.machines:
        steps, seconds, logs = run_harness(classes[name], args.seconds)
        calls, bare_seconds = replay_bare(logs, args.device)
        per_step = seconds / max(steps, 1) * 1e6
        per_call = bare_seconds / max(calls, 1) * 1e6
        print(
            f"| {name} | {args.device} | {steps} | {steps / seconds:,.0f} | {per_step:,.0f} | "
            f"{per_call:,.0f} | {per_step / per_call:.1f} |"
        )


if __name__ == "__main__":
    main()
