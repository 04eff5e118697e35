"""SWA hybrid allocator, SPEC §1.3: pairing, the sentinel, atomic failures, the free paths and
their release order, free groups, backup/restore, the SWA-tail extension and checked mode.

Every expected list was worked out by hand from the SPEC; comments give the reasoning where it
is not obvious.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from test_bad_input import decode_args, extend_args, ids, snapshot_state

from allocator import (
    DoubleFreeError,
    FreeGroupError,
    SWAPeerHeldError,
    SWATokenToKVPoolAllocator,
)
from properties.golden import nonzero_mapping


def swa(
    size: int, size_swa: int, page_size: int, device: torch.device, need_sort: bool = False, checked: bool = False
) -> SWATokenToKVPoolAllocator:
    return SWATokenToKVPoolAllocator(
        size, size_swa, page_size, torch.float16, device, need_sort=need_sort, checked=checked
    )


def as_list(result: torch.Tensor | None) -> list[int] | None:
    return None if result is None else result.tolist()


def extend(a: SWATokenToKVPoolAllocator, device: torch.device, prefix: list[int], seq: list[int], last_loc: list[int]):
    return as_list(a.alloc_extend(*extend_args(device, prefix, seq, last_loc)))


def decode(a: SWATokenToKVPoolAllocator, device: torch.device, seq: list[int], last_loc: list[int]):
    return as_list(a.alloc_decode(*decode_args(device, seq, last_loc)))


def extend_tail(a: SWATokenToKVPoolAllocator, device: torch.device, prefix: int, seq: int, last_loc: int, tail: int):
    return as_list(a.alloc_extend_swa_tail(*extend_args(device, [prefix], [seq], [last_loc]), tail))


def free_lists(a: SWATokenToKVPoolAllocator) -> tuple[list[int], list[int]]:
    """The ready free lists of the full and the SWA pool."""
    return a.full_attn_allocator.free_pages.tolist(), a.swa_attn_allocator.free_pages.tolist()


def mapping_slice(a: SWATokenToKVPoolAllocator, start: int, stop: int) -> list[int]:
    return a.full_to_swa_index_mapping[start:stop].tolist()


@pytest.fixture(params=[False, True], ids=["unchecked", "checked"])
def checked(request: pytest.FixtureRequest) -> bool:
    return request.param


# ------------------------------------------------------------------ pairing
def test_alloc_pairs_both_pools_and_sets_the_mapping(checked: bool, swa_device: torch.device) -> None:
    a = swa(8, 4, 1, swa_device, checked=checked)
    assert as_list(a.alloc(2)) == [1, 2]
    a.free_swa(ids([2, 1], swa_device))
    assert free_lists(a) == ([3, 4, 5, 6, 7, 8], [3, 4, 2, 1])

    assert as_list(a.alloc(3)) == [3, 4, 5]
    assert nonzero_mapping(a.full_to_swa_index_mapping) == [[3, 3], [4, 4], [5, 2]]
    assert (a.full_available_size(), a.swa_available_size(), a.available_size()) == (3, 1, 1)
    assert a.translate_loc_from_full_to_swa(ids([5, 3, 1, -1], swa_device)).tolist() == [2, 3, 0, -1]


def test_extend_and_decode_continue_through_the_translated_last_loc(checked: bool, swa_device: torch.device) -> None:
    a = swa(16, 16, 4, swa_device, checked=checked)
    assert extend(a, swa_device, [0], [4], [-1]) == [4, 5, 6, 7]
    a.free_swa(ids([5], swa_device))  # SWA page 1 back at the front, full page 1 still held
    assert free_lists(a) == ([2, 3, 4], [1, 2, 3, 4])

    # Full pages 2, 3 pair with SWA pages 1, 2 at the same offsets.
    assert extend(a, swa_device, [0], [6], [-1]) == [8, 9, 10, 11, 12, 13]
    # The SWA side continues after mapping[13] = 9.
    assert decode(a, swa_device, [7], [13]) == [14]
    assert nonzero_mapping(a.full_to_swa_index_mapping) == [
        [8, 4], [9, 5], [10, 6], [11, 7], [12, 8], [13, 9], [14, 10]
    ]
    assert decode(a, swa_device, [8], [14]) == [15]
    # Position 8 starts a page: full page 4 and SWA page 3.
    assert decode(a, swa_device, [9], [15]) == [16]
    assert mapping_slice(a, 15, 17) == [11, 12]
    assert free_lists(a) == ([], [4])
    assert (a.full_available_size(), a.swa_available_size(), a.available_size()) == (0, 4, 0)


# ----------------------------------------------------------------- sentinel
@pytest.mark.parametrize("page_size", [1, 4])
def test_sentinel_survives_allocation_and_clear(page_size: int, swa_device: torch.device) -> None:
    a = swa(8, 8, page_size, swa_device)
    mapping = a.full_to_swa_index_mapping
    assert mapping.numel() == 8 + page_size + 1
    assert mapping.tolist() == [0] * (8 + page_size) + [-1]

    # Every full slot handed out: the highest token index is 8 + page_size - 1, just below the sentinel.
    if page_size == 1:
        a.alloc(8)
    else:
        extend(a, swa_device, [0], [8], [-1])
    assert int(mapping[-1]) == -1
    assert a.translate_loc_from_full_to_swa(ids([-1], swa_device)).tolist() == [-1]

    a.free_group_begin()
    a.clear()
    assert not a.in_free_group
    assert a.full_to_swa_index_mapping is mapping
    assert mapping.tolist() == [0] * (8 + page_size) + [-1]
    assert a.translate_loc_from_full_to_swa(ids([-1, 1], swa_device)).tolist() == [-1, 0]
    assert (a.full_available_size(), a.swa_available_size()) == (8, 8)


# -------------------------------------------------------- atomic failures
def ps1_pair(size: int, size_swa: int, device: torch.device) -> SWATokenToKVPoolAllocator:
    """need_sort; slots 1-3 handed out and slot 2 freed again, so each pool has 2 staged."""
    a = swa(size, size_swa, 1, device, need_sort=True)
    a.alloc(3)
    a.free(ids([2], device))
    return a


def ps2_pair(size: int, size_swa: int, device: torch.device) -> SWATokenToKVPoolAllocator:
    """need_sort, ps 2; two one-token requests on pages 1 and 2, the second freed (staged)."""
    a = swa(size, size_swa, 2, device, need_sort=True)
    extend(a, device, [0, 0], [1, 1], [-1, -1])
    a.free(ids([4], device))
    return a


FAILING_ALLOCATIONS = {
    # 2 SWA slots left (1 ready + 1 staged); the SWA pool alone would merge before failing.
    "alloc-swa-short": (lambda d: ps1_pair(8, 4, d), lambda a, d: a.alloc(3)),
    "alloc-full-short": (lambda d: ps1_pair(4, 8, d), lambda a, d: a.alloc(3)),
    # 2 pages needed: SWA has only staged page 2 (pool of 2 pages); full has 3, 4 and staged 2.
    "extend-swa-short": (lambda d: ps2_pair(8, 4, d), lambda a, d: extend(a, d, [0], [4], [-1])),
    "extend-full-short": (lambda d: ps2_pair(4, 8, d), lambda a, d: extend(a, d, [0], [4], [-1])),
    # Request 1 (token 2) continues at 3; two new requests start a page each: 2 pages needed.
    "decode-swa-short": (lambda d: ps2_pair(8, 4, d), lambda a, d: decode(a, d, [2, 1, 1], [2, -1, -1])),
    "decode-full-short": (lambda d: ps2_pair(4, 8, d), lambda a, d: decode(a, d, [2, 1, 1], [2, -1, -1])),
    # A tail of all 3 tokens needs 2 SWA pages, like the 2 full pages.
    "swa-tail-swa-short": (lambda d: ps2_pair(8, 4, d), lambda a, d: extend_tail(a, d, 0, 3, -1, 3)),
    "swa-tail-full-short": (lambda d: ps2_pair(4, 8, d), lambda a, d: extend_tail(a, d, 0, 3, -1, 3)),
}


@pytest.mark.parametrize("build, call", FAILING_ALLOCATIONS.values(), ids=FAILING_ALLOCATIONS.keys())
def test_failed_allocation_changes_neither_pool_nor_the_mapping(
    build: Callable, call: Callable, swa_device: torch.device
) -> None:
    a = build(swa_device)
    before = snapshot_state(a)
    assert call(a, swa_device) is None
    assert snapshot_state(a) == before


# -------------------------------------------------------------------- frees
def test_free_swa_with_pages_frees_whole_pages_and_skips_zero_entries(checked: bool, swa_device: torch.device) -> None:
    a = swa(32, 32, 4, swa_device, checked=checked)
    extend(a, swa_device, [0], [4], [-1])
    a.free_swa(ids([4, 5, 6, 7], swa_device))
    # Full pages 2, 3, 4 pair with SWA pages 1, 2, 3.
    assert extend(a, swa_device, [0], [10], [-1]) == [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    assert mapping_slice(a, 8, 18) == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert free_lists(a) == ([5, 6, 7, 8], [4, 5, 6, 7, 8])

    # One token of full page 2 zeroes the whole page and releases SWA page 1.
    a.free_swa(ids([9], swa_device))
    assert mapping_slice(a, 8, 18) == [0, 0, 0, 0, 8, 9, 10, 11, 12, 13]
    assert free_lists(a) == ([5, 6, 7, 8], [1, 4, 5, 6, 7, 8])

    # Pages 2 (already zero), 3 and 4 (whose last two tokens were never used): only SWA pages 2, 3.
    a.free_swa(ids([8, 12, 16], swa_device))
    assert mapping_slice(a, 4, 20) == [0] * 16
    assert free_lists(a) == ([5, 6, 7, 8], [2, 3, 1, 4, 5, 6, 7, 8])
    assert (a.full_available_size(), a.swa_available_size()) == (16, 32)


def test_release_order_at_page_size_1_follows_idx(checked: bool, swa_device: torch.device) -> None:
    a = swa(8, 4, 1, swa_device, checked=checked)
    a.alloc(2)
    a.free_swa(ids([2, 1], swa_device))
    assert as_list(a.alloc(3)) == [3, 4, 5]  # SWA peers 3, 4, 2
    assert free_lists(a) == ([6, 7, 8], [1])

    a.free_swa(ids([3, 5], swa_device))  # peers 3 then 2, appended in that order
    assert free_lists(a) == ([6, 7, 8], [1, 3, 2])
    assert nonzero_mapping(a.full_to_swa_index_mapping) == [[4, 4]]
    a.free_swa(ids([1, 4], swa_device))  # full slot 1 maps to 0: skipped
    assert free_lists(a) == ([6, 7, 8], [1, 3, 2, 4])

    a.free_full(ids([2, 1], swa_device))
    assert free_lists(a) == ([6, 7, 8, 2, 1], [1, 3, 2, 4])

    assert as_list(a.alloc(2)) == [6, 7]  # SWA peers 1, 3
    a.free(ids([7, 6], swa_device))  # SWA peers 3, 1 first, then the full slots
    assert free_lists(a) == ([8, 2, 1, 7, 6], [2, 4, 3, 1])
    assert nonzero_mapping(a.full_to_swa_index_mapping) == []
    assert (a.full_available_size(), a.swa_available_size()) == (5, 4)


def test_release_order_with_pages_is_unique_pages_ascending(checked: bool, swa_device: torch.device) -> None:
    a = swa(16, 8, 2, swa_device, checked=checked)
    extend(a, swa_device, [0], [6], [-1])
    for token in (2, 4, 6):  # SWA pages 1, 2, 3 released one by one: [3, 2, 1, 4]
        a.free_swa(ids([token], swa_device))
    # Full pages 4, 5, 6 pair with SWA pages 3, 2, 1.
    assert extend(a, swa_device, [0], [6], [-1]) == [8, 9, 10, 11, 12, 13]
    assert mapping_slice(a, 8, 14) == [6, 7, 4, 5, 2, 3]
    assert free_lists(a) == ([7, 8], [4])

    a.free_swa(ids([13, 8], swa_device))  # full pages 6, 4 -> SWA pages 1, 3, ascending
    assert free_lists(a) == ([7, 8], [1, 3, 4])
    assert nonzero_mapping(a.full_to_swa_index_mapping) == [[10, 4], [11, 5]]

    a.free(ids([10], swa_device))
    assert free_lists(a) == ([5, 7, 8], [2, 1, 3, 4])
    assert nonzero_mapping(a.full_to_swa_index_mapping) == []

    a.free_full(ids([13, 2, 8], swa_device))  # full pages 6, 1, 4
    assert free_lists(a) == ([1, 4, 6, 5, 7, 8], [2, 1, 3, 4])


# -------------------------------------------------------------- free groups
def test_free_group_at_page_size_1_defers_one_release_of_each_slot(swa_device: torch.device) -> None:
    a = swa(8, 8, 1, swa_device)
    a.alloc(4)
    a.free_group_begin()
    with pytest.raises(FreeGroupError):
        a.free_group_begin()
    assert a.in_free_group

    a.free_swa(ids([3, 1], swa_device))
    assert nonzero_mapping(a.full_to_swa_index_mapping) == [[2, 2], [4, 4]], "zeroed at the call"
    a.free(ids([1, 2], swa_device))
    a.free_full(ids([3], swa_device))
    a.free(ids([2, 4], swa_device))  # slot 2 again: released once
    assert nonzero_mapping(a.full_to_swa_index_mapping) == []
    assert free_lists(a) == ([5, 6, 7, 8], [5, 6, 7, 8]), "nothing released before the end"
    assert (a.full_available_size(), a.swa_available_size()) == (4, 4)

    a.free_group_end()
    assert free_lists(a) == ([5, 6, 7, 8, 1, 2, 3, 4], [5, 6, 7, 8, 3, 1, 2, 4])
    assert (a.full_available_size(), a.swa_available_size()) == (8, 8)
    with pytest.raises(FreeGroupError):
        a.free_group_end()
    assert not a.in_free_group


def test_free_group_with_pages_puts_unique_pages_in_front_once(swa_device: torch.device) -> None:
    a = swa(12, 12, 2, swa_device)
    extend(a, swa_device, [0], [6], [-1])
    a.free_group_begin()
    a.free(ids([2], swa_device))
    a.free(ids([6], swa_device))
    a.free(ids([7], swa_device))  # page 3 again; its SWA peers are already 0
    assert nonzero_mapping(a.full_to_swa_index_mapping) == [[4, 4], [5, 5]]
    assert free_lists(a) == ([4, 5, 6], [4, 5, 6])

    a.free_group_end()
    # One free of pages {1, 3}; two separate frees would have given [3, 1, 4, 5, 6].
    assert free_lists(a) == ([1, 3, 4, 5, 6], [1, 3, 4, 5, 6])


# ---------------------------------------------------------- backup / restore
def test_backup_restore_round_trip_restores_both_pools_and_the_mapping(swa_device: torch.device) -> None:
    a = swa(16, 12, 2, swa_device, need_sort=True, checked=True)
    extend(a, swa_device, [0, 0], [5, 4], [-1, -1])  # pages 1-3 and 4-5 on both pools
    a.free(ids([8, 9, 10, 11], swa_device))
    a.free_swa(ids([2], swa_device))
    saved_state, saved = a.backup_state(), snapshot_state(a)
    mapping = a.full_to_swa_index_mapping
    assert (saved["full"]["free"], saved["full"]["staged"]) == ([6, 7, 8], [4, 5])
    assert (saved["swa"]["free"], saved["swa"]["staged"]) == ([6], [1, 4, 5])

    for _ in range(2):  # the saved state must not alias the live one
        extend(a, swa_device, [0], [8], [-1])
        a.free_swa(ids([4], swa_device))
        a.clear()
        a.alloc_decode(*decode_args(swa_device, [1], [-1]))
        a.restore_state(saved_state)
        assert snapshot_state(a) == saved
        assert a.full_to_swa_index_mapping is mapping, "the mapping is shared with the kv cache"

    # From the restored state: the full pool has 3 ready pages (threshold 3, no merge), the SWA
    # pool 1 (merge: 1, 4, 5, 6).
    assert extend(a, swa_device, [0], [2], [-1]) == [12, 13]
    assert mapping_slice(a, 12, 14) == [2, 3]


# ---------------------------------------------------------------- SWA tail
def stale_mapping(a: SWATokenToKVPoolAllocator, start: int, stop: int) -> None:
    """Leave nonzero garbage in entries that no live slot uses, as a buggy free path would."""
    a.full_to_swa_index_mapping[start:stop] = 31


def test_swa_tail_maps_only_the_tail_and_zeroes_stale_entries(swa_device: torch.device) -> None:
    a = swa(32, 32, 4, swa_device)
    stale_mapping(a, 4, 20)
    # Tail = positions 7..9 = full 11, 12, 13. SWA pages 1, 2 back positions 4..9, so the tail
    # sits at SWA 7, 8, 9: the same page offsets as on the full side.
    assert extend_tail(a, swa_device, 0, 10, -1, 3) == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert mapping_slice(a, 4, 14) == [0, 0, 0, 0, 0, 0, 0, 7, 8, 9]
    assert free_lists(a) == ([4, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8])


def test_swa_tail_of_zero_maps_every_new_slot_to_zero(swa_device: torch.device) -> None:
    a = swa(32, 32, 4, swa_device)
    stale_mapping(a, 4, 20)
    assert extend_tail(a, swa_device, 0, 6, -1, 0) == [4, 5, 6, 7, 8, 9]
    assert mapping_slice(a, 4, 10) == [0] * 6
    assert free_lists(a) == ([3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8])
    assert (a.full_available_size(), a.swa_available_size()) == (24, 32)


def test_swa_tail_covering_the_whole_extension_is_a_plain_extend(swa_device: torch.device) -> None:
    a = swa(32, 32, 4, swa_device)
    assert extend_tail(a, swa_device, 0, 6, -1, 6) == [4, 5, 6, 7, 8, 9]
    assert mapping_slice(a, 4, 10) == [4, 5, 6, 7, 8, 9]


def request_on_shifted_pages(device: torch.device) -> SWATokenToKVPoolAllocator:
    """Request A, positions 0..5, on full pages 2, 3 (tokens 8..13) paired with SWA pages 1, 2
    (4..9); full page 1 is held by a request whose SWA page was released."""
    a = swa(32, 32, 4, device)
    extend(a, device, [0], [4], [-1])
    a.free_swa(ids([4], device))
    assert extend(a, device, [0], [6], [-1]) == [8, 9, 10, 11, 12, 13]
    return a


def test_swa_tail_continues_the_current_pages_swa_peer(swa_device: torch.device) -> None:
    a = request_on_shifted_pages(swa_device)
    stale_mapping(a, 14, 19)
    # Positions 6..10: 14, 15 on full page 3, then page 4. Tail 7..10 starts on the current
    # page, whose SWA peer (page 2) continues at 9 + 2 = 11; positions 8..10 take SWA page 3.
    assert extend_tail(a, swa_device, 6, 11, 13, 4) == [14, 15, 16, 17, 18]
    assert mapping_slice(a, 12, 20) == [8, 9, 0, 11, 12, 13, 14, 0]
    assert free_lists(a) == ([5, 6, 7, 8], [4, 5, 6, 7, 8])


def test_swa_tail_takes_fresh_pages_when_the_current_peer_is_gone(swa_device: torch.device) -> None:
    a = request_on_shifted_pages(swa_device)
    a.free_swa(ids([8, 12], swa_device))  # SWA pages 1, 2 released: [1, 2, 3, ...]
    # The tail (positions 7..10) gets fresh SWA pages 1, 2 for positions 4..10, at the same
    # offsets as full pages 3, 4.
    assert extend_tail(a, swa_device, 6, 11, 13, 4) == [14, 15, 16, 17, 18]
    assert mapping_slice(a, 12, 20) == [0, 0, 0, 7, 8, 9, 10, 0]
    assert free_lists(a) == ([5, 6, 7, 8], [3, 4, 5, 6, 7, 8])


# -------------------------------------------------------------- checked mode
@pytest.fixture
def checked_pair(swa_device: torch.device) -> SWATokenToKVPoolAllocator:
    a = swa(8, 8, 1, swa_device, checked=True)
    a.alloc(3)
    return a


def test_checked_free_of_an_unallocated_slot_raises(checked_pair, swa_device: torch.device) -> None:
    before = snapshot_state(checked_pair)
    with pytest.raises(DoubleFreeError):
        checked_pair.free(ids([2, 5], swa_device))
    assert snapshot_state(checked_pair) == before


def test_checked_double_free_raises(checked_pair, swa_device: torch.device) -> None:
    checked_pair.free(ids([2], swa_device))
    before = snapshot_state(checked_pair)
    with pytest.raises(DoubleFreeError):
        checked_pair.free(ids([2], swa_device))
    assert snapshot_state(checked_pair) == before


@pytest.mark.parametrize(
    "page_size, first, second, available_after",
    [
        (1, [1], [1], 6),  # slots 4-8 free, then slot 1 once
        (2, [2], [3], 4),  # page 4 free, then page 1 once (token 3 is on the page token 2 freed)
    ],
)
def test_checked_double_free_inside_a_group_raises(
    page_size: int, first: list[int], second: list[int], available_after: int, swa_device: torch.device
) -> None:
    a = swa(8, 8, page_size, swa_device, checked=True)
    if page_size == 1:
        a.alloc(3)
    else:
        extend(a, swa_device, [0], [6], [-1])
    a.free_group_begin()
    a.free(ids(first, swa_device))
    before = snapshot_state(a)
    with pytest.raises(DoubleFreeError):
        a.free(ids(second, swa_device))
    assert snapshot_state(a) == before
    a.free_group_end()
    assert (a.full_available_size(), a.swa_available_size()) == (available_after, available_after)


def test_checked_free_full_with_a_live_swa_peer_raises(checked_pair, swa_device: torch.device) -> None:
    checked_pair.free_swa(ids([1], swa_device))
    before = snapshot_state(checked_pair)
    with pytest.raises(SWAPeerHeldError):
        checked_pair.free_full(ids([1, 3], swa_device))
    assert snapshot_state(checked_pair) == before
    checked_pair.free_full(ids([1], swa_device))
    assert checked_pair.full_attn_allocator.free_pages.tolist() == [4, 5, 6, 7, 8, 1]
