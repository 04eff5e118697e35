"""Model-free probe speed: run_probes through torch and through the fused Triton kernels.

CUDA: a serving-like allocator state per pool size, built through the reference allocator's
own calls: requests of `--request` tokens fill three quarters of the full pool, each keeps SWA
slots only for its last `--window` tokens (free_swa of the pages before), and every third
request is freed again. Both paths must pack identical rows (checked before timing).

Columns: kernels = device kernels and memory operations one call launches (torch profiler);
eager = back-to-back calls (host launch cost shows where it exceeds GPU time); graph = the
same call captured once in a CUDA graph and replayed (GPU time alone); floor = one read of
the mapping and both free lists (in order) at the device's copy bandwidth, measured in this
run (bench_divergence.copy_bandwidth); graph / triton = the path's graph time over the Triton
path's.

CPU (--smoke): the state machines' pattern on small pools, after every step: view the
allocator, run every probe, read the packed rows back.

From the repository root:
    python -m bench.bench_probes                 # CUDA, pools of 64K, 256K, 1M, 4M tokens
    python -m bench.bench_probes --smoke         # CPU, small pools
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from allocator import SWATokenToKVPoolAllocator
from bench.bench_divergence import copy_bandwidth, eager_us, graph_us
from canary.probes import AllocatorView, run_probes

IMPLS = ("triton", "torch")
SMALL_POOLS = (
    # (size_full, size_swa, page_size, tokens allocated)
    (64, 32, 4, 10),
    (24, 24, 1, 10),
    (1024, 512, 16, 100),
    (1100, 600, 1, 300),
)


def build_allocator(
    size: int, page_size: int, request: int, window: int, device: torch.device
) -> SWATokenToKVPoolAllocator:
    allocator = SWATokenToKVPoolAllocator(size, size // 2, page_size, torch.float16, device)
    requests = []
    while allocator.full_available_size() > size // 4:
        tokens = allocate(allocator, request)
        if tokens is None:
            break
        evicted = (request - window) // page_size * page_size
        if evicted > 0:
            allocator.free_swa(tokens[:evicted])
        requests.append(tokens)
    for tokens in requests[::3]:
        allocator.free(tokens)
    return allocator


def probe_and_read(allocator: SWATokenToKVPoolAllocator) -> list:
    """One probe check of the allocator, read back to the host (what the canary does per check)."""
    return run_probes(AllocatorView.of(allocator)).packed.tolist()


def allocate(allocator: SWATokenToKVPoolAllocator, count: int) -> torch.Tensor | None:
    if allocator.page_size == 1:
        return allocator.alloc(count)
    device, cpu = allocator.device, torch.device("cpu")
    lengths = {"prefix": [0], "seq": [count]}
    return allocator.alloc_extend(
        torch.tensor(lengths["prefix"], device=device),
        torch.tensor(lengths["prefix"], device=cpu),
        torch.tensor(lengths["seq"], device=device),
        torch.tensor(lengths["seq"], device=cpu),
        torch.tensor([-1], device=device),
        count,
    )


def count_kernels(call, device: torch.device) -> int:
    """Device kernels, memsets and copies one call launches."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(device)
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def top_kernels(call, device: torch.device, rows: int = 8) -> str:
    """The kernels with the most device time in one call, as a profiler table."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(device)
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows)


def floor_us(view: AllocatorView, bytes_per_s: float) -> float:
    read_once = (view.mapping.numel() + view.full_free.numel() + view.swa_free.numel()) * 8
    return read_once / bytes_per_s * 1e6


def small_pools(iters: int, warmup: int) -> None:
    """Microseconds per state-machine check on CPU: view, every probe, read back."""
    cpu = torch.device("cpu")
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; one check = "
          "run_probes(AllocatorView.of(allocator)).packed.tolist()")
    print()
    print("| pool tokens (full / SWA) | page size | tokens allocated | µs per check |")
    print("|---:|---:|---:|---:|")
    for size, size_swa, page_size, tokens in SMALL_POOLS:
        allocator = SWATokenToKVPoolAllocator(size, size_swa, page_size, torch.float16, cpu)
        allocate(allocator, tokens)
        check = partial(probe_and_read, allocator)
        print(f"| {size} / {size_swa} | {page_size} | {tokens} | {eager_us(check, cpu, iters, warmup):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, small pools")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 16, 1 << 18, 1 << 20, 1 << 22])
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--request", type=int, default=4096, help="tokens per request")
    parser.add_argument("--window", type=int, default=1024, help="tokens that keep an SWA slot")
    parser.add_argument("--peak-bandwidth", type=float, default=None,
                        help="bandwidth in B/s for the floor (default: the device's copy bandwidth, measured)")
    parser.add_argument("--iters", type=int, default=50, help="calls per timed round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also list the costliest kernels of each call")
    args = parser.parse_args()

    if args.smoke:
        small_pools(iters=200, warmup=20)
        return
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device; use --smoke on CPU")
    device = torch.device("cuda")
    bandwidth = args.peak_bandwidth or copy_bandwidth(device)
    source = "given" if args.peak_bandwidth else "measured copy"

    print(f"device: {torch.cuda.get_device_name(device)}, SWA pool = half the full pool, requests of "
          f"{args.request} tokens keeping {args.window} in the window, {source} bandwidth {bandwidth / 1e12:.3f} TB/s")
    print()
    print("| pool tokens | page size | free full / SWA units | violations | impl | kernels | eager µs | graph µs "
          "| floor µs | graph / triton |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    profiles = []
    for size in args.sizes:
        for page_size in args.page_sizes:
            allocator = build_allocator(size, page_size, args.request, args.window, device)
            view = AllocatorView.of(allocator)
            calls = {impl: partial(run_probes, view, impl=impl) for impl in args.impls}
            packed = {impl: call().packed for impl, call in calls.items()}
            first = next(iter(packed.values()))
            if not all(torch.equal(first, rows) for rows in packed.values()):
                raise SystemExit(f"pool {size}, page size {page_size}: the paths pack different rows")
            found = len(calls[args.impls[0]]().read())
            graph = {impl: graph_us(call, device, args.iters, args.warmup) for impl, call in calls.items()}
            for impl, call in calls.items():
                eager = eager_us(call, device, args.iters, args.warmup)
                ratio = f"{graph[impl] / graph['triton']:.2f}x" if "triton" in graph else "-"
                print(f"| {size} | {page_size} | {view.full_free.numel()} / {view.swa_free.numel()} | {found} "
                      f"| {impl} | {count_kernels(call, device)} | {eager:.1f} | {graph[impl]:.1f} "
                      f"| {floor_us(view, bandwidth):.1f} | {ratio} |")
                if args.profile:
                    profiles.append(f"pool {size}, page size {page_size}, {impl}:\n{top_kernels(call, device)}")
            del allocator, view, calls, packed
            torch.cuda.empty_cache()
    for table in profiles:
        print()
        print(table)


if __name__ == "__main__":
    main()
