"""Out-of-process targets: steps per second in process and in a worker, side by side, in one run.

For each machine, the reference allocator in the harness's process (`reference`) and in a
worker under this interpreter (`reference@`) run in alternating rounds, every round with the
same Hypothesis seed, so both sides run the same programs and a noisy machine slows both
alike. Each side's time is wall time beside CPU time: the harness process's
(`time.process_time`) and, out of process, the worker's too (its fork server and every
session it forked, read from /proc), so the ratio of CPU time says what isolation costs in
work, not only in waiting.

Then the cost of one round trip: the median wall time of one `alloc(0)` (a call that changes
nothing, answered with the whole state read-back) over many calls, in process and in a
worker, at a few pool sizes (the read-back grows with the pool).

    python -m bench.bench_isolation [--seconds 30] [--machines RequestMachinePS1 RequestMachinePS16]
                                    [--round-trips 2000] [--pool-tokens 64 1024 16384]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import seed as hypothesis_seed
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from properties.machines import machine_classes
from properties.runners.check import Stats, bind_stats, check_phases
from properties.settings import prepare_process
from properties.targets import AllocatorConfig, Target, resolve_target

TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int, children: bool) -> float:
    """CPU seconds of process `pid` (user + system), with its reaped children's if asked."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / TICKS


def worker_cpu(target: Target) -> float:
    """CPU seconds of an isolated target's worker: its fork server, the sessions it reaped and
    the sessions still running."""
    server = target_server(target)
    pid = server.process.pid
    total = process_cpu(pid, children=True)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += process_cpu(int(child), children=False)
            except FileNotFoundError:  # a session that ended meanwhile
                pass
    return total


def target_server(target: Target):
    """The worker server behind an isolated target's factory."""
    from properties.targets.isolated import _SERVERS

    (server,) = [server for (spec, _python), server in _SERVERS.items() if f"{spec}@" == target.name]
    return server


@dataclass
class Side:
    """One target's totals over the rounds."""

    target: Target
    steps: int = 0
    wall: float = 0.0
    harness_cpu: float = 0.0
    worker_cpu: float = 0.0

    @property
    def isolated(self) -> bool:
        return "@" in self.target.name

    def run(self, machine_name: str, round_seed: int, run_settings: settings) -> None:
        stats = Stats()
        machine = bind_stats(machine_classes(self.target, "cpu")[machine_name], stats)
        worker = worker_cpu(self.target) if self.isolated else 0.0
        cpu, wall = time.process_time(), time.perf_counter()
        run_state_machine_as_test(hypothesis_seed(round_seed)(machine), settings=run_settings)
        self.wall += time.perf_counter() - wall
        self.harness_cpu += time.process_time() - cpu
        self.worker_cpu += (worker_cpu(self.target) - worker) if self.isolated else 0.0
        self.steps += stats.steps

    @property
    def cpu(self) -> float:
        return self.harness_cpu + self.worker_cpu


def measure(machine_name: str, seconds: float, sides: tuple[Side, Side]) -> None:
    run_settings = settings(
        settings.get_profile("ci"), max_examples=10, derandomize=False, database=None, phases=check_phases()
    )
    for side in sides:  # warm up: the worker's first session, the machines' caches
        side.run(machine_name, 0, run_settings)
        side.steps, side.wall, side.harness_cpu, side.worker_cpu = 0, 0.0, 0.0, 0.0
    started, round_seed = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        round_seed += 1
        for side in sides if round_seed % 2 else sides[::-1]:
            side.run(machine_name, round_seed, run_settings)


def round_trip_us(target: Target, pool_tokens: int, calls: int) -> float:
    """Median wall µs of one alloc(0) on a pool of `pool_tokens` tokens, half of them in use."""
    allocator = target.factory(AllocatorConfig(pool_tokens, pool_tokens, 1))
    allocator.alloc(pool_tokens // 2)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        allocator.alloc(0)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="per machine, both sides together (default 30)")
    parser.add_argument("--machines", nargs="*", default=["RequestMachinePS1", "RequestMachinePS16"])
    parser.add_argument("--round-trips", type=int, default=2000, help="calls per round-trip median (default 2000)")
    parser.add_argument("--pool-tokens", type=int, nargs="*", default=[64, 1024, 16384])
    args = parser.parse_args()
    prepare_process()
    local, isolated = resolve_target("reference"), resolve_target("reference@")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} core(s); "
        "CPU: harness + worker"
    )
    print(
        "| machine | target | steps | steps/s (wall) | µs/step wall | µs/step CPU (harness + worker) "
        "| out/in steps/s (wall) | out/in (CPU) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.machines:
        sides = (Side(local), Side(isolated))
        measure(name, args.seconds, sides)
        inside, outside = sides
        for side in sides:
            wall_us, cpu_us = side.wall / side.steps * 1e6, side.cpu / side.steps * 1e6
            split = (
                f" ({side.harness_cpu / side.steps * 1e6:,.0f} + {side.worker_cpu / side.steps * 1e6:,.0f})"
                if side.isolated
                else ""
            )
            ratios = "| | |"
            if side is outside:
                wall_ratio = (outside.steps / outside.wall) / (inside.steps / inside.wall)
                cpu_ratio = (outside.steps / outside.cpu) / (inside.steps / inside.cpu)
                ratios = f"| {wall_ratio:.0%} | {cpu_ratio:.0%} |"
            print(
                f"| {name} | {side.target.name} | {side.steps} | {side.steps / side.wall:,.0f} | {wall_us:,.0f} "
                f"| {cpu_us:,.0f}{split} {ratios}",
                flush=True,
            )
    print()
    print("| pool tokens | in process µs/call | in a worker µs/call (round trip) | round trip - in process |")
    print("|---:|---:|---:|---:|")
    for tokens in args.pool_tokens:
        here, there = round_trip_us(local, tokens, args.round_trips), round_trip_us(isolated, tokens, args.round_trips)
        print(f"| {tokens} | {here:,.1f} | {there:,.1f} | {there - here:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
