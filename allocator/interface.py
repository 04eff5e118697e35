"""The SPEC §1 allocator interface, as a `typing.Protocol`, and the form of its calls' arguments.

`SWAAllocator` is what a target's factory returns and what the probes, the driver and the
differential check read: the reference allocator (`allocator.swa`), sglang's own and any other
allocator with the same methods satisfy it structurally, without inheriting anything.

A call is written down (in golden traces, the driver's log and exported findings) as its name
and positional arguments in plain form: index lists and ints. `TENSOR_ARGS` says which
positions are index tensors, `CPU_ARGS` which of those live on the host (the `*_cpu` copies of
the lengths); `call_arguments` turns the plain form back into the call's arguments.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

TENSOR_ARGS: dict[str, tuple[int, ...]] = {
    "alloc": (),
    "alloc_extend": (0, 1, 2, 3, 4),
    "alloc_decode": (0, 1, 2),
    "alloc_extend_swa_tail": (0, 1, 2, 3, 4),
    "free": (0,),
    "free_swa": (0,),
    "free_full": (0,),
}
CPU_ARGS: dict[str, tuple[int, ...]] = {"alloc_extend": (1, 3), "alloc_decode": (1,), "alloc_extend_swa_tail": (1, 3)}


def call_arguments(call: dict[str, Any], device: torch.device | str) -> list[Any]:
    """The positional arguments of a call in plain form, with index lists turned into int64
    tensors (on `device`, or on the host for the `*_cpu` arguments).

    Args:
        call: {"call": method name, "args": plain positional arguments}.
        device: where the index tensors go.

    Returns:
        The arguments to call the method with.
    """
    tensor_positions = TENSOR_ARGS.get(call["call"], ())
    cpu_positions = CPU_ARGS.get(call["call"], ())
    arguments = []
    for position, value in enumerate(call["args"]):
        if position in tensor_positions:
            where = "cpu" if position in cpu_positions else device
            value = torch.tensor(value, dtype=torch.int64, device=where)
        arguments.append(value)
    return arguments


class Pool(Protocol):
    """One of the two pools of the hybrid allocator. The probes read its free units through
    `get_all_free_pages()` where it has one, else through `free_pages` and `release_pages`
    (sglang's pools): no one method is required."""


class SWAAllocator(Protocol):
    """A hybrid SWA KV-cache allocator (SPEC §1.3). Sizes are Python ints; indices are int64
    tensors on the allocator's device; allocations return None, changing nothing, when a pool
    cannot serve them. `page_size > 1` allocators offer `alloc_extend`, `alloc_decode` and
    `alloc_extend_swa_tail`; page size 1 ones `alloc`."""

    # Read-only members, so that an allocator's attributes may be of narrower types.
    @property
    def page_size(self) -> int: ...

    @property
    def size(self) -> int:
        """Full-attention token slots."""

    @property
    def size_swa(self) -> int: ...

    @property
    def full_attn_allocator(self) -> Pool: ...

    @property
    def swa_attn_allocator(self) -> Pool: ...

    @property
    def full_to_swa_index_mapping(self) -> torch.Tensor:
        """Entry t: the SWA slot of full slot t (0: none); size + page_size + 1 entries, -1 last."""

    def available_size(self) -> int: ...

    def full_available_size(self) -> int: ...

    def swa_available_size(self) -> int: ...

    def translate_loc_from_full_to_swa(self, kv_indices: torch.Tensor) -> torch.Tensor: ...

    def alloc(self, need_size: int) -> torch.Tensor | None: ...

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
    ) -> torch.Tensor | None: ...

    def alloc_decode(
        self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, last_loc: torch.Tensor
    ) -> torch.Tensor | None: ...

    def alloc_extend_swa_tail(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
        swa_tail_len: int,
    ) -> torch.Tensor | None: ...

    def free(self, free_index: torch.Tensor) -> None: ...

    def free_swa(self, free_index: torch.Tensor) -> None: ...

    def free_full(self, free_index: torch.Tensor) -> None: ...

    def free_group_begin(self) -> None: ...

    def free_group_end(self) -> None: ...

    def backup_state(self) -> Any: ...

    def restore_state(self, state: Any) -> None: ...

    def clear(self) -> None: ...
