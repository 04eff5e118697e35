"""The one comparison of an allocator with what it should be: each field it compares makes it
report a difference, the order of staged units never does, and fields an expectation leaves
out are not compared. Golden replay, the machines' CONTRACT check, the differential check and
exported findings all go through it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from allocator import SWATokenToKVPoolAllocator
from properties.compare import (
    AllocatorState,
    FreeList,
    dense_mapping,
    differences,
    read_state,
)
from properties.golden import load_traces, replay_trace
from properties.targets import AllocatorConfig
from properties.targets.mutants import mutant_factory

STATE = AllocatorState(
    result=[3, 4],
    sizes=(6, 2, 2),
    mapping=dense_mapping(10, [(3, 1), (4, 2)]),
    full_free=FreeList([5, 6, 7, 8], [1, 2]),
    swa_free=FreeList([3, 4]),
    in_free_group=False,
)


def test_an_equal_state_has_no_difference() -> None:
    assert differences(STATE, STATE) == []


@pytest.mark.parametrize(
    ("change", "reported"),
    [
        ({"result": None}, "returned (the allocator None, the reference [3, 4])"),
        ({"sizes": (6, 2, 1)}, "sizes (full, SWA, available) (the allocator (6, 2, 1), the reference (6, 2, 2))"),
        (
            {"mapping": dense_mapping(10, [(3, 1), (4, 3)])},
            "mapping differs at [4] (the allocator [3], the reference [2])",
        ),
        ({"mapping": dense_mapping(11, [(3, 1), (4, 2)])}, "mapping length (the allocator 11, the reference 10)"),
        ({"full_free": FreeList([6, 5, 7, 8, 1, 2])}, "full free list (the allocator [6, 5, 7, 8, 1, 2]"),
        ({"swa_free": FreeList([3])}, "swa free list (the allocator [3], the reference [3, 4])"),
        ({"in_free_group": True}, "free group open (the allocator True, the reference False)"),
    ],
)
def test_each_field_reports_its_difference(change: dict, reported: str) -> None:
    found = differences(replace(STATE, **change), STATE)
    assert len(found) == 1 and found[0].startswith(reported), found


def test_staged_units_compare_in_any_order_ready_units_in_order() -> None:
    assert differences(replace(STATE, full_free=FreeList([5, 6, 7, 8, 2, 1])), STATE) == []
    assert differences(replace(STATE, full_free=FreeList([5, 6, 7, 2, 8, 1])), STATE) != []


def test_unordered_free_units_compare_as_multisets() -> None:
    other = replace(STATE, full_free=FreeList([2, 1, 8, 7, 6, 5]))
    assert differences(other, replace(STATE, full_free=STATE.full_free.unordered())) == []
    missing = replace(STATE, full_free=FreeList([1, 8, 7, 6, 5, 5]))
    assert differences(missing, replace(STATE, full_free=STATE.full_free.unordered())) != []


def test_fields_an_expectation_leaves_out_are_not_compared() -> None:
    unknown = replace(STATE, full_free=None, swa_free=None, in_free_group=None)
    assert differences(replace(STATE, full_free=FreeList([]), in_free_group=True), unknown) == []


def test_read_state_reads_an_allocator() -> None:
    allocator = SWATokenToKVPoolAllocator(8, 4, 1, torch.float16, "cpu")
    out = allocator.alloc(2)
    state = read_state(allocator, out)
    assert state == AllocatorState(
        [1, 2], (6, 2, 2), dense_mapping(10, [(1, 1), (2, 2)]), FreeList([3, 4, 5, 6, 7, 8]), FreeList([3, 4]), False
    )


TRACES = list(load_traces(Path(__file__).parent / "golden" / "sglang-0.5.23-swa-traces.jsonl"))


def test_golden_replay_reports_the_first_call_a_mutant_gets_wrong() -> None:
    factory = mutant_factory("available_uses_max")

    def make_allocator(config: dict) -> SWATokenToKVPoolAllocator:
        sizes = (config["size"], config["size_swa"], config["page_size"])
        return factory(AllocatorConfig(*sizes, "cpu", config["need_sort"]))

    found = [difference for trace in TRACES if (difference := replay_trace(trace, make_allocator)) is not None]
    assert found
    assert all(line.startswith("call #") and "sizes (full, SWA, available) (got" in line for line in found)
