"""Replaying recorded allocator traces (the golden sglang 0.5.23 format, golden/README.md).

A trace is a config plus a list of calls with their recorded results, sizes and mapping.
`replay_trace` drives any allocator with the SPEC §1 interface through it and returns the
first mismatch, so the same replay checks our reference and sglang's own allocator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

TENSOR_ARGS = {
    "alloc": (),
    "alloc_extend": (0, 1, 2, 3, 4),
    "alloc_decode": (0, 1, 2),
    "alloc_extend_swa_tail": (0, 1, 2, 3, 4),
    "free": (0,),
    "free_swa": (0,),
    "free_full": (0,),
}
CPU_ARGS = {"alloc_extend": (1, 3), "alloc_decode": (1,), "alloc_extend_swa_tail": (1, 3)}


@dataclass(frozen=True)
class Mismatch:
    call_index: int
    call: str
    field: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        return f"call #{self.call_index} {self.call}: {self.field} expected {self.expected!r}, got {self.actual!r}"


def load_traces(path: str | Path) -> Iterator[dict]:
    with open(path) as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def call_arguments(call: dict, device: torch.device | str) -> list:
    """The recorded positional arguments, with index lists turned into int64 tensors."""
    tensor_positions = TENSOR_ARGS.get(call["call"], ())
    cpu_positions = CPU_ARGS.get(call["call"], ())
    arguments = []
    for position, value in enumerate(call["args"]):
        if position in tensor_positions:
            where = "cpu" if position in cpu_positions else device
            value = torch.tensor(value, dtype=torch.int64, device=where)
        arguments.append(value)
    return arguments


def nonzero_mapping(mapping: torch.Tensor) -> list[list[int]]:
    """[full, swa] for every nonzero entry except the trailing sentinel."""
    body = mapping[:-1].cpu()
    full = torch.nonzero(body).flatten()
    return [[int(f), int(body[f])] for f in full]


def replay_trace(
    trace: dict, make_allocator: Callable[[dict], Any], device: torch.device | str = "cpu"
) -> Mismatch | None:
    allocator = make_allocator(trace["config"])
    mapping = allocator.full_to_swa_index_mapping
    config = trace["config"]
    if mapping.numel() != config["mapping_len"] or int(mapping[-1]) != config["sentinel"]:
        return Mismatch(
            -1, "__init__", "mapping", (config["mapping_len"], config["sentinel"]), (mapping.numel(), int(mapping[-1]))
        )
    for index, call in enumerate(trace["calls"]):
        result = getattr(allocator, call["call"])(*call_arguments(call, device))
        observed = {
            "result": None if result is None else result.cpu().tolist(),
            "full_available": allocator.full_available_size(),
            "swa_available": allocator.swa_available_size(),
            "available": allocator.available_size(),
            "mapping_nonzero": nonzero_mapping(allocator.full_to_swa_index_mapping),
        }
        for field, actual in observed.items():
            if call[field] != actual:
                return Mismatch(index, call["call"], field, call[field], actual)
    return None
