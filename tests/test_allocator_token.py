"""Token allocator (page size 1), SPEC §1.1: every expected list below was worked out by hand."""

from __future__ import annotations

import pytest
import torch
from test_bad_input import ids

from allocator import TokenToKVPoolAllocator


def free_lists(pool: TokenToKVPoolAllocator) -> tuple[list[int], list[int]]:
    return pool.free_pages.tolist(), pool.release_pages.tolist()


def test_alloc_hands_out_slots_from_the_front_in_order(swa_device: torch.device) -> None:
    pool = TokenToKVPoolAllocator(8, torch.float16, swa_device)
    assert free_lists(pool) == ([1, 2, 3, 4, 5, 6, 7, 8], [])

    assert pool.alloc(3).tolist() == [1, 2, 3]
    assert pool.alloc(2).tolist() == [4, 5]
    assert pool.alloc(0).tolist() == []
    assert free_lists(pool) == ([6, 7, 8], [])
    assert pool.available_size() == 3


def test_free_appends_slots_in_call_order(swa_device: torch.device) -> None:
    pool = TokenToKVPoolAllocator(8, torch.float16, swa_device)
    pool.alloc(5)

    pool.free(ids([4, 2], swa_device))
    assert free_lists(pool) == ([6, 7, 8, 4, 2], [])
    pool.free(ids([5], swa_device))
    pool.free(torch.empty(0, dtype=torch.int64, device=swa_device))
    assert free_lists(pool) == ([6, 7, 8, 4, 2, 5], [])
    assert pool.available_size() == 6

    assert pool.alloc(4).tolist() == [6, 7, 8, 4]
    assert free_lists(pool) == ([2, 5], [])


def test_need_sort_stages_frees_and_merges_exactly_when_short(swa_device: torch.device) -> None:
    pool = TokenToKVPoolAllocator(8, torch.float16, swa_device, need_sort=True)
    assert pool.alloc(6).tolist() == [1, 2, 3, 4, 5, 6]

    pool.free(ids([5, 2], swa_device))
    pool.free(ids([4], swa_device))
    assert free_lists(pool) == ([7, 8], [5, 2, 4])
    assert pool.available_size() == 5, "staged slots count as available"
    assert pool.get_all_free_pages().tolist() == [7, 8, 5, 2, 4]

    # n == len(free): no merge, the staged slots stay staged.
    assert pool.alloc(2).tolist() == [7, 8]
    assert free_lists(pool) == ([], [5, 2, 4])

    # n > len(free): merge first, free = sort(free ++ staged).
    assert pool.alloc(1).tolist() == [2]
    assert free_lists(pool) == ([4, 5], [])

    pool.free(ids([1], swa_device))
    assert free_lists(pool) == ([4, 5], [1])
    assert pool.alloc(3).tolist() == [1, 4, 5]
    assert free_lists(pool) == ([], [])
    assert pool.available_size() == 0


def test_alloc_too_large_returns_none_and_changes_nothing(swa_device: torch.device) -> None:
    pool = TokenToKVPoolAllocator(4, torch.float16, swa_device)
    pool.alloc(2)
    pool.free(ids([2], swa_device))
    assert free_lists(pool) == ([3, 4, 2], [])

    assert pool.alloc(4) is None
    assert free_lists(pool) == ([3, 4, 2], [])
    assert pool.available_size() == 3
    assert pool.alloc(3).tolist() == [3, 4, 2]


def test_failed_alloc_with_need_sort_keeps_its_merge_but_takes_nothing(swa_device: torch.device) -> None:
    # The merge trigger fires before the capacity check, so a failing alloc leaves the free
    # list merged and sorted; nothing is handed out and the available size is unchanged.
    pool = TokenToKVPoolAllocator(4, torch.float16, swa_device, need_sort=True)
    pool.alloc(3)
    pool.free(ids([3, 2], swa_device))
    assert free_lists(pool) == ([4], [3, 2])

    assert pool.alloc(4) is None
    assert free_lists(pool) == ([2, 3, 4], [])
    assert pool.available_size() == 3


@pytest.mark.parametrize("need_sort", [False, True])
def test_available_size_counts_free_and_staged_slots(need_sort: bool, swa_device: torch.device) -> None:
    pool = TokenToKVPoolAllocator(6, torch.float16, swa_device, need_sort=need_sort)
    assert pool.available_size() == 6
    pool.alloc(5)
    assert pool.available_size() == 1
    pool.free(ids([3, 1], swa_device))
    assert pool.available_size() == 3
    pool.clear()
    assert pool.available_size() == 6
    assert free_lists(pool) == ([1, 2, 3, 4, 5, 6], [])
