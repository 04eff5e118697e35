"""Divergence detector speed: fused Triton kernel vs vectorised torch vs the sglang formulation.

The "sglang-formulation" baseline is the straightforward way to compare a batch through the mapping,
as sglang's swa_full_idx_divergence check does: gather whole req_to_token rows, mask by
seq_lens, look every entry up in the mapping. It counts only non-identity pairs, so it is a
lower bound on what a one-off torch check costs, not a full detector.

Roofline: the bytes that must be read are the live req_to_token entries (read in order) plus
the mapping entries they point at, gathered at random: DRAM serves a gather in 32-byte
sectors, so the floor counts each distinct sector the live tokens touch (one per token at page
size 1 with pages in random order, one per 4 consecutive slots of a page otherwise);
fraction = those bytes / (time * the device's copy bandwidth, measured in this run: bytes
read + written per second by a 1 GiB device-to-device copy).

From the repository root:
    python -m bench.bench_divergence            # CUDA, batch 64/256/1024 x context 4K/32K
    python -m bench.bench_divergence --smoke    # CPU, small sizes, torch paths only
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from canary.divergence import detect_divergence

SECTOR_BYTES = 32
COPY_BYTES = 1 << 30


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES, iters: int = 10) -> float:
    """The device's memory bandwidth as a large copy reaches it: bytes read + written per
    second, the best of `iters` copies of `nbytes` (what a roofline here should divide by,
    rather than a datasheet peak of some other device)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) * 1e-3
        else:
            started = time.perf_counter()
            target.copy_(source)
            seconds = time.perf_counter() - started
        best = min(best, seconds)
    del source, target
    return 2 * nbytes / best


def build_state(batch: int, context: int, window: int, page_size: int, device: torch.device, seed: int) -> dict:
    """A serving-like batch: every request has its own full pages in shuffled order, lengths
    between half and all of the context, and an SWA slot for each in-window token."""
    generator = torch.Generator(device=device).manual_seed(seed)
    pages_per_row = context // page_size
    num_pages = batch * pages_per_row
    page_order = torch.randperm(num_pages, device=device, generator=generator) + 1  # page 0 is padding
    offsets = torch.arange(page_size, device=device)
    req_to_token = (page_order.view(batch, pages_per_row, 1) * page_size + offsets).view(batch, context)
    seq_lens = torch.randint(context // 2, context + 1, (batch,), device=device, generator=generator)

    size = (num_pages + 1) * page_size
    size_swa = batch * window
    mapping = torch.zeros(size + page_size + 1, dtype=torch.int64, device=device)
    mapping[-1] = -1
    positions = torch.arange(context, device=device)
    in_window = (positions >= (seq_lens - window).clamp_min(0)[:, None]) & (positions < seq_lens[:, None])
    paired = req_to_token[in_window]
    mapping[paired] = torch.randperm(size_swa, device=device, generator=generator)[: paired.numel()] + page_size
    return dict(
        req_to_token=req_to_token.to(torch.int32),
        req_pool_indices=torch.randperm(batch, device=device, generator=generator),
        seq_lens=seq_lens,
        window=window,
        mapping=mapping,
        page_size=page_size,
        swa_slots=size_swa + page_size,
    )


def sglang_formulation(req_to_token: Tensor, req_pool_indices: Tensor, seq_lens: Tensor, mapping: Tensor) -> Tensor:
    full = req_to_token[req_pool_indices].long()
    live = torch.arange(full.shape[1], device=full.device) < seq_lens[:, None]
    slot = mapping[full]
    return (live & (slot != 0) & (slot != full)).sum(dim=1)


ROUNDS = 5


def eager_us(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Microseconds per call, calls issued back to back as a serving loop would: the median over
    ROUNDS rounds of `iters` calls. CUDA events on GPU (host launch cost shows only where it
    exceeds the GPU time), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(ROUNDS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            rounds.append(start.elapsed_time(end) * 1e3 / iters)
        else:
            start_s = time.perf_counter()
            for _ in range(iters):
                fn()
            rounds.append((time.perf_counter() - start_s) * 1e6 / iters)
    return statistics.median(rounds)


def graph_us(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """GPU time alone: `fn` captured once in a CUDA graph and replayed, timed like eager_us."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return eager_us(graph.replay, device, iters, warmup)


def live_token_count(state: dict) -> int:
    return int(state["seq_lens"].clamp(0, state["req_to_token"].shape[1]).sum())


def live_slots(state: dict) -> Tensor:
    """The full slots of every live token (the req_to_token entries the detector reads)."""
    rows = state["req_to_token"][state["req_pool_indices"]]
    live = torch.arange(rows.shape[1], device=rows.device) < state["seq_lens"][:, None]
    return rows[live].long()


def required_bytes(state: dict) -> int:
    """One read of each live req_to_token entry, plus every distinct 32-byte sector of the
    mapping that the live tokens' entries lie in."""
    slots = live_slots(state)
    per_sector = SECTOR_BYTES // state["mapping"].element_size()
    sectors = torch.unique(slots // per_sector).numel()
    return slots.numel() * state["req_to_token"].element_size() + sectors * SECTOR_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, small sizes, torch paths only")
    parser.add_argument("--peak-bandwidth", type=float, default=None,
                        help="bandwidth in B/s for the roofline (default: the device's copy bandwidth, measured)")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20, help="calls per timed round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    args = parser.parse_args()
    if args.page_size < 1 or any(context % args.page_size for context in args.contexts):
        parser.error("--page-size must be >= 1 and divide every context")

    if args.smoke:
        device = torch.device("cpu")
        batches, contexts, window, iters, warmup = [4, 16], [256, 1024], 128, 3, 1
        impls = ["torch", "sglang-formulation"]
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device; use --smoke on CPU")
        device = torch.device("cuda")
        batches, contexts, window, iters, warmup = args.batches, args.contexts, args.window, args.iters, args.warmup
        impls = ["triton", "torch", "sglang-formulation"]

    on_gpu = device.type == "cuda"
    bandwidth = args.peak_bandwidth or copy_bandwidth(device, COPY_BYTES if on_gpu else 1 << 26)
    source = "given" if args.peak_bandwidth else "measured copy"
    print(f"device: {torch.cuda.get_device_name(device) if on_gpu else 'cpu'}, window {window}, "
          f"page size {args.page_size}, {source} bandwidth {bandwidth / 1e12:.3f} TB/s, "
          f"median of {ROUNDS} rounds of {iters} calls")
    print("eager: back-to-back calls; graph: CUDA graph replay (GPU time); roofline and ratio use "
          "graph time on GPU, eager time on CPU")
    print()
    print(
        "| batch | context | live tokens | floor MB | impl | eager µs | graph µs | floor µs "
        "| roofline | time / triton |"
    )
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for context in contexts:
        for batch in batches:
            state = build_state(batch, context, window, args.page_size, device, seed=batch * context)
            bytes_needed, live_tokens = required_bytes(state), live_token_count(state)
            calls = {
                "triton": partial(detect_divergence, **state, impl="triton"),
                "torch": partial(detect_divergence, **state, impl="torch"),
                "sglang-formulation": partial(
                    sglang_formulation,
                    state["req_to_token"], state["req_pool_indices"], state["seq_lens"], state["mapping"],
                ),
            }
            eager = {impl: eager_us(calls[impl], device, iters, warmup) for impl in impls}
            graph = {impl: graph_us(calls[impl], device, iters, warmup) for impl in impls} if on_gpu else {}
            reference = graph or eager
            floor = bytes_needed / bandwidth * 1e6
            for impl in impls:
                ratio = f"{reference[impl] / reference['triton']:.2f}x" if "triton" in reference else "-"
                graph_cell = f"{graph[impl]:.1f}" if on_gpu else "-"
                print(f"| {batch} | {context} | {live_tokens} | {bytes_needed / 1e6:.1f} | {impl} | {eager[impl]:.1f} "
                      f"| {graph_cell} | {floor:.1f} | {floor / reference[impl]:.1%} | {ratio} |")
            del state
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
