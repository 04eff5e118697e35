"""Replaying recorded allocator traces (the golden sglang 0.5.23 format, tests/golden/README.md).

A trace is a config plus a list of calls with their recorded results, sizes and mapping.
`replay_trace` drives any allocator with the SPEC §1 interface through it and returns the
first difference, so the same replay checks our reference and sglang's own allocator.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from allocator.interface import SWAAllocator, call_arguments
from properties.compare import AllocatorState, dense_mapping, differences, read_state


def load_traces(path: str | Path) -> Iterator[dict[str, Any]]:
    """The traces of a JSON-lines file, one per non-empty line."""
    with open(path) as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def nonzero_mapping(mapping: torch.Tensor) -> list[list[int]]:
    """[full, swa] for every nonzero entry except the trailing sentinel (the traces' form)."""
    body = mapping[:-1].cpu()
    full = torch.nonzero(body).flatten()
    return [[int(f), int(body[f])] for f in full]


def recorded_state(call: dict[str, Any], mapping_len: int) -> AllocatorState:
    """What the recorded allocator showed right after `call` (the trace records no free lists)."""
    sizes = (call["full_available"], call["swa_available"], call["available"])
    return AllocatorState(call["result"], sizes, dense_mapping(mapping_len, call["mapping_nonzero"]))


def replay_trace(
    trace: dict[str, Any], make_allocator: Callable[[dict[str, Any]], SWAAllocator], device: torch.device | str = "cpu"
) -> str | None:
    """Replay one trace on the allocator `make_allocator(trace["config"])` builds.

    Args:
        trace: {"config": ..., "calls": [...]} in the golden format.
        make_allocator: builds the allocator under test from the trace's config.
        device: where the index arguments go.

    Returns:
        None if every call returned and showed what was recorded, else the first difference.
    """
    config = trace["config"]
    allocator = make_allocator(config)
    mapping = allocator.full_to_swa_index_mapping
    if mapping.numel() != config["mapping_len"] or int(mapping[-1]) != config["sentinel"]:
        return (
            f"after construction: mapping has {mapping.numel()} entries, sentinel {int(mapping[-1])}; "
            f"recorded {config['mapping_len']}, sentinel {config['sentinel']}"
        )
    for index, call in enumerate(trace["calls"]):
        result = getattr(allocator, call["call"])(*call_arguments(call, device))
        recorded = recorded_state(call, config["mapping_len"])
        found = differences(read_state(allocator, result), recorded, ("got", "recorded"))
        if found:
            return f"call #{index} {call['call']}: " + "; ".join(found)
    return None
