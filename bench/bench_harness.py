"""Harness throughput: steps per second of one worker, beside its two floors, in one run.

For each machine, three things run in alternating rounds (so that a noisy machine slows
each of them alike), every round with the same Hypothesis seed:

- the harness: the machine with every check on, keeping each program's call log;
- the empty machine: the same rules, strategies, bundles and invariant, doing nothing (what
  Hypothesis alone costs per step: the floor the harness cannot go under);
- the bare allocator: afterwards, the logged calls replayed on a fresh allocator per program.

Every number is per step (one rule and its invariant check) on both sides of a ratio, in CPU
time (`time.process_time`) beside wall time. `--pool-tokens N ...` fixes both pools at N
tokens instead of the machines' small drawn pools, to show how the cost grows with the pool.

    python -m bench.bench_harness [--seconds 20] [--device cpu|cuda] [--machines RequestMachinePS1 ...]
                                  [--pool-tokens 64 16384 65536]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch
from hypothesis import seed as hypothesis_seed
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from allocator import AllocatorError
from properties.machines import AllocatorMachine, machine_classes
from properties.machines.driver import AllocatorDriver
from properties.runners.check import Stats, bind_stats, check_phases
from properties.settings import PROFILES, prepare_process
from properties.targets import AllocatorConfig, reference_factory


@dataclass
class Clock:
    """CPU and wall seconds, summed over timed sections, and the steps taken in them."""

    cpu: float = 0.0
    wall: float = 0.0
    steps: int = 0
    logs: list[dict] = field(default_factory=list)

    def time(self, run, *args, **kwargs) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        run(*args, **kwargs)
        self.cpu += time.process_time() - cpu
        self.wall += time.perf_counter() - wall

    def per_step_us(self) -> tuple[float, float]:
        steps = max(self.steps, 1)
        return self.cpu / steps * 1e6, self.wall / steps * 1e6


def recording(machine: type[AllocatorMachine], clock: Clock, pool_tokens: int | None) -> type[AllocatorMachine]:
    """The machine, keeping each program's call log (and with fixed pools, if asked)."""

    class Recording(machine):  # type: ignore[valid-type, misc]
        def start(self, size: int, size_swa: int, page_size: int, need_sort: bool) -> None:
            if pool_tokens is not None:
                size = size_swa = max(page_size, pool_tokens // page_size * page_size)
            super().start(size, size_swa, page_size, need_sort)

        def teardown(self) -> None:
            if self.allocator is not None:
                clock.logs.append({"config": self.model.config(), "calls": list(self.driver.log)})
            super().teardown()

    return Recording


def empty_machine(machine: type[RuleBasedStateMachine], clock: Clock) -> type[RuleBasedStateMachine]:
    """A machine with `machine`'s rules (same strategies, bundles and targets, no
    preconditions) and one invariant, all doing nothing: Hypothesis's own cost per step."""
    state = machine.setup_state()
    namespace: dict = {"page_size": getattr(machine, "page_size", 1)}  # strategies read it from the runner
    counter = iter(range(10**12))

    def body(targets: tuple[str, ...]):
        def run(self, **_arguments):
            return next(counter) if targets else None

        return run

    for index, each in enumerate(state.initializers):
        targets = tuple(Bundle(name) for name in each.targets)
        namespace[f"initialize_{index}"] = initialize(targets=targets, **each.arguments)(body(each.targets))
    for index, each in enumerate(state.rules):
        targets = tuple(Bundle(name) for name in each.targets)
        namespace[f"rule_{index}"] = rule(targets=targets, **each.arguments)(body(each.targets))

    def count_step(self) -> None:
        clock.steps += 1

    namespace["check"] = invariant()(count_step)
    return type(f"Empty{machine.__name__}", (RuleBasedStateMachine,), namespace)


def replay_bare(logs: list[dict], device: str) -> Clock:
    """Every logged call again on a fresh allocator per program (construction not timed)."""
    clock = Clock()
    for program in logs:
        driver = AllocatorDriver(reference_factory(AllocatorConfig(device=device, **program["config"])), device)
        clock.time(replay_calls, driver, program["calls"], device)
    return clock


def replay_calls(driver: AllocatorDriver, calls: list[dict], device: str) -> None:
    for entry in calls:
        try:  # programs also probe misuse, which the allocator must reject
            driver.call(entry["call"], *entry["args"])
        except AllocatorError:
            pass
    if device == "cuda":
        torch.cuda.synchronize()


def measure(machine: type[AllocatorMachine], seconds: float, pool_tokens: int | None) -> tuple[Clock, Clock]:
    """Harness and empty machine, one short run each per round, the same seed per round."""
    harness, empty = Clock(), Clock()
    stats = Stats()
    checked = bind_stats(recording(machine, harness, pool_tokens), stats)
    floor = empty_machine(machine, empty)
    run_settings = settings(
        PROFILES["ci"], max_examples=10, derandomize=False, database=None, phases=check_phases()
    )
    started, round_seed = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        round_seed += 1
        harness.time(run_state_machine_as_test, hypothesis_seed(round_seed)(checked), settings=run_settings)
        empty.time(run_state_machine_as_test, hypothesis_seed(round_seed)(floor), settings=run_settings)
    harness.steps = stats.steps
    return harness, empty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="per machine (default 20)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--machines", nargs="*", default=["RequestMachinePS1", "RequestMachinePS16", "SlotMachine"])
    parser.add_argument("--pool-tokens", type=int, nargs="*", default=[None], help="fix both pools at N tokens")
    args = parser.parse_args()
    prepare_process()
    classes = machine_classes("reference", args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); µs per step, CPU / wall")
    print(
        "| machine | pool tokens | steps | steps/s (CPU) | harness µs/step | empty machine µs/step "
        "| bare allocator µs/step | harness / empty (CPU) | harness - empty - bare (CPU) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.machines:
        for pool_tokens in args.pool_tokens:
            harness, empty = measure(classes[name], args.seconds, pool_tokens)
            bare = replay_bare(harness.logs, args.device)
            bare.steps = harness.steps
            (h_cpu, h_wall), (e_cpu, e_wall) = harness.per_step_us(), empty.per_step_us()
            b_cpu, b_wall = bare.per_step_us()
            print(
                f"| {name} | {pool_tokens or 'drawn'} | {harness.steps} | {1e6 / h_cpu:,.0f} "
                f"| {h_cpu:,.0f} / {h_wall:,.0f} "
                f"| {e_cpu:,.0f} / {e_wall:,.0f} | {b_cpu:,.0f} / {b_wall:,.0f} | {h_cpu / e_cpu:.2f} "
                f"| {h_cpu - e_cpu - b_cpu:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
