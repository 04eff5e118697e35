"""The reference allocator replays every recorded sglang 0.5.23 trace exactly (golden/README.md),
with and without checked mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from allocator import SWATokenToKVPoolAllocator
from properties.golden import load_traces, replay_trace

TRACE_FILE = Path(__file__).parent / "golden" / "sglang-0.5.23-swa-traces.jsonl"
TRACES = list(load_traces(TRACE_FILE))


def trace_id(index: int, trace: dict) -> str:
    config = trace["config"]
    order = "sorted" if config["need_sort"] else "unsorted"
    return f"trace{index:02d}-ps{config['page_size']}-{order}-{config['size']}x{config['size_swa']}"


def test_all_forty_traces_are_there() -> None:
    assert len(TRACES) == 40


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
@pytest.mark.parametrize("trace", TRACES, ids=[trace_id(index, trace) for index, trace in enumerate(TRACES)])
def test_reference_replays_trace(trace: dict, checked: bool, swa_device: torch.device) -> None:
    def make_allocator(config: dict) -> SWATokenToKVPoolAllocator:
        return SWATokenToKVPoolAllocator(
            config["size"], config["size_swa"], config["page_size"], torch.float16, swa_device,
            need_sort=config["need_sort"], checked=checked,
        )

    difference = replay_trace(trace, make_allocator, swa_device)
    assert difference is None, difference
