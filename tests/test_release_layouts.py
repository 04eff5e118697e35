"""How the probes read allocators laid out as older sglang releases lay them out: a mapping of
size + size_swa + 1 entries with no sentinel (up to 0.5.7), available_size() raising
NotImplementedError (0.4.9.post6-0.5.x), and the two ways of keeping free-group state."""

from __future__ import annotations

import torch

from allocator import SWATokenToKVPoolAllocator
from canary.probes import AllocatorView, run_probes
from properties.machines.step_checks import observe


class PaddedLayout(SWATokenToKVPoolAllocator):
    """The reference allocator with a 0.5.7-style mapping: the tokens' entries, then spare
    zeros, no sentinel; and no available_size()."""

    mapping_layout = "padded"

    def __init__(self, size: int, size_swa: int) -> None:
        super().__init__(size, size_swa, 1, torch.float16, "cpu")
        spare = torch.zeros(size_swa - 1, dtype=torch.int64)
        self.full_to_swa_index_mapping = torch.cat(
            (self.full_to_swa_index_mapping[: size + 1], spare, torch.zeros(1, dtype=torch.int64))
        )

    def available_size(self) -> int:
        raise NotImplementedError


def test_a_padded_mapping_is_read_as_its_release_defines_it() -> None:
    allocator = PaddedLayout(8, 4)
    slots = allocator.full_attn_allocator.alloc(2)
    allocator.full_to_swa_index_mapping[slots] = allocator.swa_attn_allocator.alloc(2)
    view = AllocatorView.of(allocator)
    assert view.mapping.numel() == 8 + 1 + 1 and view.mapping[-1] == -1
    assert set(view.inapplicable) == {"SENTINEL", "AVAIL"}
    assert view.available == min(view.full_available, view.swa_available)
    assert run_probes(view).read() == []
    observed = observe(allocator, None)
    assert observed.translated == observed.mapping[:-1]


def test_a_corrupted_padded_mapping_is_still_caught() -> None:
    allocator = PaddedLayout(8, 4)
    allocator.full_to_swa_index_mapping[3] = 2  # full slot 3 is free, its entry points at SWA slot 2
    found = {violation.invariant for violation in run_probes(AllocatorView.of(allocator)).read()}
    assert "STALE" in found


class FlagGroups:
    """Free-group state as sglang up to 0.5.18 keeps it: a flag, and a list at all times."""

    def __init__(self, open_group: bool) -> None:
        self.is_not_in_free_group = not open_group
        self.free_group: list = []


def test_free_group_state_of_every_release_is_read() -> None:
    from canary.probes import _in_free_group

    assert not _in_free_group(FlagGroups(False), ())
    assert _in_free_group(FlagGroups(True), ())
    newer = type("NoneGroups", (), {"free_group": None})()
    assert not _in_free_group(newer, ())
    newer.free_group = []
    assert _in_free_group(newer, ())
