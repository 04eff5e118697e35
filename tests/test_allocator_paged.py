"""Paged allocator (page size > 1), SPEC §1.2.

The example tests use hand-computed expectations; the property test compares the vectorised
alloc_extend / alloc_decode with the plain loops of loop_reference on random valid inputs.
"""

from __future__ import annotations

from itertools import accumulate

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loop_reference import decode_indices_loop, extend_indices_loop
from test_bad_input import decode_args, extend_args, ids

from allocator import PagedTokenToKVPoolAllocator


def paged(size: int, page_size: int, device: torch.device, need_sort: bool = False) -> PagedTokenToKVPoolAllocator:
    return PagedTokenToKVPoolAllocator(size, page_size, torch.float16, device, need_sort=need_sort)


def extend(
    pool: PagedTokenToKVPoolAllocator, device: torch.device, prefix: list[int], seq: list[int], last_loc: list[int]
):
    result = pool.alloc_extend(*extend_args(device, prefix, seq, last_loc))
    return None if result is None else result.tolist()


def decode(pool: PagedTokenToKVPoolAllocator, device: torch.device, seq: list[int], last_loc: list[int]):
    result = pool.alloc_decode(*decode_args(device, seq, last_loc))
    return None if result is None else result.tolist()


def free(pool: PagedTokenToKVPoolAllocator, device: torch.device, tokens: list[int]) -> None:
    pool.free(ids(tokens, device))


def free_lists(pool: PagedTokenToKVPoolAllocator) -> tuple[list[int], list[int]]:
    return pool.free_pages.tolist(), pool.release_pages.tolist()


# ------------------------------------------------------------ hand-computed
def test_alloc_takes_whole_pages_in_free_list_order(swa_device: torch.device) -> None:
    pool = paged(16, 4, swa_device)
    assert free_lists(pool) == ([1, 2, 3, 4], [])
    assert pool.alloc(8).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert pool.alloc(4).tolist() == [12, 13, 14, 15]
    assert pool.available_size() == 4

    assert pool.alloc(8) is None
    assert free_lists(pool) == ([4], [])
    assert pool.alloc(4).tolist() == [16, 17, 18, 19]
    assert pool.available_size() == 0


def test_free_puts_unique_pages_ascending_at_the_front(swa_device: torch.device) -> None:
    pool = paged(16, 2, swa_device)
    assert pool.alloc(12).tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]

    free(pool, swa_device, [11, 4, 5, 10])  # pages 5, 2, 2, 5
    assert free_lists(pool) == ([2, 5, 7, 8], [])
    free(pool, swa_device, [3])  # one token frees its whole page 1
    assert free_lists(pool) == ([1, 2, 5, 7, 8], [])
    free(pool, swa_device, [13, 6])  # pages 6, 3
    assert free_lists(pool) == ([3, 6, 1, 2, 5, 7, 8], [])
    assert pool.available_size() == 14

    assert pool.alloc(6).tolist() == [6, 7, 12, 13, 2, 3]
    assert free_lists(pool) == ([2, 5, 7, 8], [])


def test_alloc_extend_continues_fills_and_ends_mid_page_in_request_order(swa_device: torch.device) -> None:
    pool = paged(64, 4, swa_device)
    # A: positions 0..5 on pages 1, 2; B: positions 0..2 on page 3.
    assert extend(pool, swa_device, [0, 0], [6, 3], [-1, -1]) == [4, 5, 6, 7, 8, 9, 12, 13, 14]

    # Shuffle the front of the free list with real frees: it becomes 5, 6, 4, 7, ...
    pool.alloc(12)  # pages 4, 5, 6
    free(pool, swa_device, [16])
    free(pool, swa_device, [25])
    free(pool, swa_device, [20, 23, 21])
    assert free_lists(pool) == ([5, 6, 4, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [])

    # A: 6..14 = rest of page 2 (10, 11), whole page 5, partial page 6.
    # B: 3..3 = the last slot of page 3 (15), no new page.
    # C: 0..4 = whole page 4, partial page 7.
    result = extend(pool, swa_device, [6, 3, 0], [15, 4, 5], [9, 14, -1])
    assert result == [10, 11, 20, 21, 22, 23, 24, 25, 26, 15, 16, 17, 18, 19, 28]
    assert free_lists(pool) == ([8, 9, 10, 11, 12, 13, 14, 15, 16], [])
    assert pool.available_size() == 36

    assert extend(pool, swa_device, [0], [37], [-1]) is None, "needs 10 pages, 9 are free"
    assert free_lists(pool) == ([8, 9, 10, 11, 12, 13, 14, 15, 16], [])


def test_alloc_decode_at_and_away_from_page_boundaries(swa_device: torch.device) -> None:
    pool = paged(32, 4, swa_device)
    assert extend(pool, swa_device, [0, 0, 0], [4, 6, 8], [-1, -1, -1]) == [
        4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 18, 19, 20, 21, 22, 23,
    ]
    pool.alloc(8)  # pages 6, 7
    free(pool, swa_device, [24])
    free(pool, swa_device, [28])
    assert free_lists(pool) == ([7, 6, 8], [])

    # A and C start pages (positions 4 and 8) and take pages 7, 6 in request order; B continues.
    assert decode(pool, swa_device, [5, 7, 9], [7, 13, 23]) == [28, 14, 24]
    assert free_lists(pool) == ([8], [])
    # Mid-page for all three, B on its page's last slot.
    assert decode(pool, swa_device, [6, 8, 10], [28, 14, 24]) == [29, 15, 25]
    assert decode(pool, swa_device, [7, 9, 11], [29, 15, 25]) == [30, 32, 26]
    assert free_lists(pool) == ([], [])
    # No page starts, so an empty free list is enough.
    assert decode(pool, swa_device, [8, 10, 12], [30, 32, 26]) == [31, 33, 27]
    # A starts a page and none is free.
    assert decode(pool, swa_device, [9, 11, 13], [31, 33, 27]) is None
    assert free_lists(pool) == ([], [])


# ------------------------------------------------------ need_sort merge triggers
@pytest.fixture
def sorted_pool_with_staged_page(swa_device: torch.device) -> PagedTokenToKVPoolAllocator:
    """ps 2, need_sort, 8 pages: pages 1-5 handed out, then page 2 freed, so 3 pages are
    ready (6, 7, 8) and page 2 is staged."""
    pool = paged(16, 2, swa_device, need_sort=True)
    pool.alloc(10)
    free(pool, swa_device, [4, 5])
    assert free_lists(pool) == ([6, 7, 8], [2])
    return pool


@pytest.mark.parametrize(
    "need_size, expected, after",
    [
        (6, [12, 13, 14, 15, 16, 17], ([], [2])),  # 3 pages, 3 ready: no merge
        (8, [4, 5, 12, 13, 14, 15, 16, 17], ([], [])),  # 4 pages > 3 ready: merge first
    ],
)
def test_alloc_merges_when_pages_exceed_ready_list(
    sorted_pool_with_staged_page, need_size: int, expected: list[int], after, swa_device: torch.device
) -> None:
    assert sorted_pool_with_staged_page.alloc(need_size).tolist() == expected
    assert free_lists(sorted_pool_with_staged_page) == after


@pytest.mark.parametrize(
    "seq, expected, after",
    [
        ([3], [12, 13, 14], ([8], [2])),  # 3 // 2 + 1 + 1 = 3, not > 3: no merge
        ([4], [4, 5, 12, 13], ([7, 8], [])),  # 4 // 2 + 1 + 1 = 4 > 3: merge, though 2 pages suffice
        ([1, 1], [4, 12], ([7, 8], [])),  # 2 // 2 + 2 + 1 = 4 > 3: the batch size counts
    ],
)
def test_alloc_extend_merges_on_its_threshold(
    sorted_pool_with_staged_page, seq: list[int], expected: list[int], after, swa_device: torch.device
) -> None:
    zeros = [0] * len(seq)
    assert extend(sorted_pool_with_staged_page, swa_device, zeros, seq, [-1] * len(seq)) == expected
    assert free_lists(sorted_pool_with_staged_page) == after


@pytest.mark.parametrize(
    "seq, last_loc, expected, after",
    [
        # R1 and R3 start pages, R2 continues: batch 3, not > 3 ready pages: no merge.
        ([3, 2, 5], [3, 6, 9], [12, 7, 14], ([8], [2])),
        # R4 (mid-page) added: batch 4 > 3: merge, though still only 2 pages are needed.
        ([3, 2, 5, 4], [3, 6, 9, 10], [4, 7, 12, 11], ([7, 8], [])),
    ],
)
def test_alloc_decode_merges_when_batch_exceeds_ready_list(
    sorted_pool_with_staged_page,
    seq: list[int],
    last_loc: list[int],
    expected: list[int],
    after,
    swa_device: torch.device,
) -> None:
    assert decode(sorted_pool_with_staged_page, swa_device, seq, last_loc) == expected
    assert free_lists(sorted_pool_with_staged_page) == after


# ------------------------------------------------------- against the loop
@st.composite
def extend_programs(draw: st.DrawFn) -> dict:
    """A pool whose free list is a random permutation, requests with random prefix and
    extension lengths, and a few decode steps after the extension."""
    page_size = draw(st.integers(2, 64))
    batch = draw(st.integers(1, 4))
    lengths = st.lists(st.integers(0, 3 * page_size), min_size=batch, max_size=batch)
    prefix_lens, extend_lens = draw(lengths), draw(lengths)
    decode_steps = draw(st.integers(0, 3))
    final_lens = [prefix + extend + decode_steps for prefix, extend in zip(prefix_lens, extend_lens)]
    num_pages = sum(-(-length // page_size) for length in final_lens) + draw(st.integers(1, 3))
    return {
        "page_size": page_size,
        "prefix_lens": prefix_lens,
        "seq_lens": [prefix + extend for prefix, extend in zip(prefix_lens, extend_lens)],
        "decode_steps": decode_steps,
        "free_order": draw(st.permutations(range(1, num_pages + 1))),
        # None: the prefix is allocated for real first; else the page each last_loc points into.
        "last_loc_pages": draw(st.none() | st.lists(st.integers(1, num_pages), min_size=batch, max_size=batch)),
    }


def synthetic_last_loc(prefix: int, page: int, page_size: int) -> int:
    """A last_loc on `page` that continues `prefix` (the page's last slot when prefix ends a page)."""
    return -1 if prefix == 0 else page * page_size + (prefix - 1) % page_size


def advance(last_loc: list[int], prefix: list[int], seq: list[int], indices: list[int]) -> list[int]:
    """Each request's last token after an extension that returned `indices`."""
    ends = accumulate(s - p for p, s in zip(prefix, seq))
    return [indices[end - 1] if s > p else old for old, p, s, end in zip(last_loc, prefix, seq, ends)]


# Cheap enough to run more examples than the profile's default; a larger profile still wins.
@settings(
    max_examples=max(150, settings.default.max_examples),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, *settings.default.suppress_health_check],
)
@given(program=extend_programs())
def test_vectorised_indices_match_the_loop_reference(program: dict, swa_device: torch.device) -> None:
    ps, prefix_lens, seq_lens = program["page_size"], program["prefix_lens"], program["seq_lens"]
    pool = paged(len(program["free_order"]) * ps, ps, swa_device)
    # Reach the random free-list order with real frees: each freed page goes to the front.
    pool.alloc(pool.size)
    for page in reversed(program["free_order"]):
        free(pool, swa_device, [page * ps + ps - 1])
    assert pool.free_pages.tolist() == list(program["free_order"])

    def extend_and_compare(prefix: list[int], seq: list[int], last_loc: list[int]) -> list[int]:
        ready = pool.free_pages.tolist()
        expected, pages_taken = extend_indices_loop(prefix, seq, last_loc, ready, ps)
        assert extend(pool, swa_device, prefix, seq, last_loc) == expected
        assert pool.free_pages.tolist() == ready[pages_taken:]
        return advance(last_loc, prefix, seq, expected)

    batch = len(seq_lens)
    if program["last_loc_pages"] is None:
        last_loc = extend_and_compare([0] * batch, prefix_lens, [-1] * batch)
    else:
        last_loc = [synthetic_last_loc(p, page, ps) for p, page in zip(prefix_lens, program["last_loc_pages"])]
    last_loc = extend_and_compare(prefix_lens, seq_lens, last_loc)

    for _ in range(program["decode_steps"]):
        seq_lens = [seq + 1 for seq in seq_lens]
        ready = pool.free_pages.tolist()
        expected, pages_taken = decode_indices_loop(seq_lens, last_loc, ready, ps)
        assert decode(pool, swa_device, seq_lens, last_loc) == expected
        assert pool.free_pages.tolist() == ready[pages_taken:]
        last_loc = expected
