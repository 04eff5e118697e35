"""sglang 0.5.23's own allocator, built by the adapter, replays every recorded trace exactly
(golden/README.md): the adapter's mapping-only pool is all the allocator needs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from allocator.sglang_adapter import SglangUnavailableError, make_sglang_allocator
from properties.golden import load_traces, replay_trace

TRACE_FILE = Path(__file__).parent / "golden" / "sglang-0.5.23-swa-traces.jsonl"
TRACES = list(load_traces(TRACE_FILE))


@pytest.mark.sglang
@pytest.mark.parametrize("trace", TRACES, ids=[f"trace{index:02d}" for index in range(len(TRACES))])
def test_sglang_replays_trace(trace: dict, swa_device: torch.device) -> None:
    pytest.importorskip("sglang", reason="sglang is not installed (.ci/install-sglang)")

    def make_allocator(config: dict):
        return make_sglang_allocator(
            config["size"], config["size_swa"], config["page_size"], swa_device, config["need_sort"]
        )

    difference = replay_trace(trace, make_allocator, swa_device)
    assert difference is None, difference


def test_missing_sglang_is_a_typed_error_naming_the_installer(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes the import fail whether or not sglang is installed.
    monkeypatch.setitem(sys.modules, "sglang.srt.mem_cache.allocator.swa", None)
    with pytest.raises(SglangUnavailableError, match=r"\.ci/install-sglang") as raised:
        make_sglang_allocator(16, 8, 1)
    assert isinstance(raised.value, ImportError)
