"""Runtime canary cost: the device time of one check, and what the canary adds to a serving
step.

Table 1, per pool size: a serving-like state built through the allocator's own calls
(requests of `--request` tokens fill three quarters of the full pool, each keeps SWA slots for
its last `--window` tokens, every third is freed; the rest form the batch). "probes" is
run_probes alone; "check" is what the monitor queues per check: the probes, the divergence
detector over the batch, the packing into one buffer and its copy into pinned host memory.
eager = calls back to back (host launch cost shows where it exceeds GPU time); graph = the
monitor's step captured in a CUDA graph and replayed (GPU time alone).

Table 2: the serving simulator (canary.simulate) stepped with the canary off, every 16
steps and every step, the three runs interleaved step by step so that they share the
machine's state; ms per step includes waiting for the GPU at the end of each step. The sync
columns count host synchronisations per step (torch.cuda sync debug mode) in the scheduler's
own work and in the canary's step.

From the repository root:
    python -m bench.bench_canary             # CUDA: pools of 64K, 256K, 1M, 4M tokens
    python -m bench.bench_canary --smoke     # CPU, small pools and a short simulation
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import replace
from functools import partial
from typing import Callable

import torch

from allocator import SWATokenToKVPoolAllocator
from bench.bench_divergence import eager_us, graph_us
from bench.bench_probes import allocate
from canary.monitor import attach
from canary.probes import AllocatorView, run_probes
from canary.simulate import SimulationConfig, Simulator
from canary.sweep import Batch, sweep, sweep_rows


def serving_state(
    size: int, page_size: int, request: int, window: int, device: torch.device
) -> tuple[SWATokenToKVPoolAllocator, dict[str, torch.Tensor]]:
    """The allocator and its live batch (one req_to_token row per live request)."""
    allocator = SWATokenToKVPoolAllocator(size, size // 2, page_size, torch.float16, device)
    evicted = max(0, request - window) // page_size * page_size
    requests = []
    while allocator.full_available_size() > size // 4:
        tokens = allocate(allocator, request)
        if tokens is None:
            break
        if evicted:
            allocator.free_swa(tokens[:evicted])
        requests.append(tokens)
    for tokens in requests[::3]:
        allocator.free(tokens)
    live = [tokens for index, tokens in enumerate(requests) if index % 3]
    count = len(live)
    batch = {
        "req_to_token": torch.stack(live),
        "req_pool_indices": torch.arange(count, device=device),
        "seq_lens": torch.full((count,), request, dtype=torch.int64, device=device),
        "evict_floors": torch.full((count,), evicted, dtype=torch.int64, device=device),
    }
    return allocator, batch


def check_call(allocator: SWATokenToKVPoolAllocator, batch: dict[str, torch.Tensor], window: int) -> Callable[[], None]:
    """The device work the monitor queues for one check, into buffers allocated once."""
    view = AllocatorView.of(allocator)
    names = run_probes(view).names
    out = torch.empty((sweep_rows(len(names)), 9), dtype=torch.int64, device=view.mapping.device)
    host = torch.empty(out.shape, dtype=torch.int64, pin_memory=view.mapping.is_cuda)
    packed_batch = Batch(**batch)

    def call() -> None:
        sweep(AllocatorView.of(allocator), packed_batch, window, out=out)
        host.copy_(out, non_blocking=True)

    return call


def captured_step_us(allocator: SWATokenToKVPoolAllocator, batch: dict, window: int, iters: int, warmup: int) -> float:
    monitor = attach(allocator, every=1, window=window)
    return graph_us(lambda: monitor.step(**batch), torch.device("cuda"), iters, warmup)


def probe_table(args: argparse.Namespace, device: torch.device, sizes: list[int], iters: int, warmup: int) -> None:
    on_gpu = device.type == "cuda"
    print(f"### One check, requests of {args.request} tokens keeping {args.window} in the window\n")
    print(
        "| pool tokens | page size | batch requests | probes eager µs | probes graph µs "
        "| check eager µs | check graph µs |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        for page_size in args.page_sizes:
            allocator, batch = serving_state(size, page_size, args.request, args.window, device)
            view = AllocatorView.of(allocator)
            probes = partial(run_probes, view)
            check = check_call(allocator, batch, args.window)
            cells = [eager_us(probes, device, iters, warmup)]
            cells.append(graph_us(probes, device, iters, warmup) if on_gpu else None)
            cells.append(eager_us(check, device, iters, warmup))
            cells.append(captured_step_us(allocator, batch, args.window, iters, warmup) if on_gpu else None)
            shown = " | ".join("-" if cell is None else f"{cell:.1f}" for cell in cells)
            print(f"| {size} | {page_size} | {batch['seq_lens'].numel()} | {shown} |")
            del allocator, batch, view
            if on_gpu:
                torch.cuda.empty_cache()
    print()


def count_syncs(call: Callable[[], None]) -> int:
    """Host synchronisations `call` makes, as CUDA sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def simulator_table(
    args: argparse.Namespace, device: torch.device, config: SimulationConfig, steps: int, warmup: int
) -> None:
    on_gpu = device.type == "cuda"
    variants = {"off": dict(canary="off"), "every 16": dict(every=16), "every 1": dict(every=1)}
    simulators = {name: Simulator(replace(config, **options)) for name, options in variants.items()}
    seconds = dict.fromkeys(simulators, 0.0)
    for step in range(warmup + steps):
        for name, simulator in simulators.items():
            started = time.perf_counter()
            simulator.step()
            if on_gpu:
                torch.cuda.synchronize(device)
            if step >= warmup:
                seconds[name] += time.perf_counter() - started
    syncs = {}
    if on_gpu:
        sync_steps = max(1, steps // 4)
        for name, simulator in simulators.items():
            scheduler = canary = 0
            for _ in range(sync_steps):
                scheduler += count_syncs(simulator.advance)
                canary += count_syncs(simulator.check)
            syncs[name] = (scheduler / sync_steps, canary / sync_steps)
    print(f"### Serving simulator: {steps} steps after {warmup} warm-up, page size {config.page_size}, "
          f"pools {config.size} / {config.size_swa}, window {config.window}\n")
    print("| canary | ms / step | vs off | checks | syncs / step: scheduler | syncs / step: canary |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, simulator in simulators.items():
        stats = simulator.monitor.stats()
        scheduler, canary = (f"{value:.1f}" for value in syncs[name]) if on_gpu else ("-", "-")
        print(f"| {name} | {seconds[name] / steps * 1e3:.2f} | {seconds[name] / seconds['off']:.3f}x "
              f"| {stats.checks} | {scheduler} | {canary} |")
        if simulator.report.records:
            print(f"\nunexpected records from '{name}': {simulator.report.records}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, small pools, a short simulation")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 16, 1 << 18, 1 << 20, 1 << 22])
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--request", type=int, default=4096, help="tokens per request of the state in table 1")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=50, help="calls per timed round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sim-steps", type=int, default=300)
    parser.add_argument("--sim-page-size", type=int, default=16)
    args = parser.parse_args()

    if args.smoke:
        device, sizes, iters, warmup = torch.device("cpu"), [1 << 12, 1 << 14], 3, 1
        args.request, args.window = 256, 64
        config = SimulationConfig(size=1 << 14, size_swa=1 << 12, window=128, page_size=args.sim_page_size,
                                  prefill_budget=512, prompt_tokens=(16, 512), output_tokens=(8, 128), seed=1)
        sim_steps, sim_warmup = 40, 5
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device; use --smoke on CPU")
        device, sizes, iters, warmup = torch.device("cuda"), args.sizes, args.iters, args.warmup
        config = SimulationConfig(size=1 << 18, size_swa=1 << 16, window=args.window, page_size=args.sim_page_size,
                                  device="cuda", max_running=128, arrival_rate=1.0, seed=1)
        sim_steps, sim_warmup = args.sim_steps, 50
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}\n")
    probe_table(args, device, sizes, iters, warmup)
    simulator_table(args, device, config, sim_steps, sim_warmup)


if __name__ == "__main__":
    main()
