"""Plain-loop references for the paged allocator's index computation (SPEC §1.2).

They walk one request at a time and one position at a time, so they can be checked by eye;
the tests compare the vectorised allocator with them. A position that starts a page takes the
next page of the free list; any other position continues right after the previous token.
"""

from __future__ import annotations

from typing import Sequence


def extend_indices_loop(
    prefix_lens: Sequence[int],
    seq_lens: Sequence[int],
    last_loc: Sequence[int],
    free_pages: Sequence[int],
    page_size: int,
) -> tuple[list[int], int]:
    """The token of every position prefix_i .. seq_i - 1, request after request, and the
    number of pages taken from the front of `free_pages`."""
    indices: list[int] = []
    pages_taken = 0
    for prefix, seq, previous in zip(prefix_lens, seq_lens, last_loc):
        for position in range(prefix, seq):
            if position % page_size == 0:
                previous = free_pages[pages_taken] * page_size
                pages_taken += 1
            else:
                previous += 1
            indices.append(previous)
    return indices, pages_taken


def decode_indices_loop(
    seq_lens: Sequence[int], last_loc: Sequence[int], free_pages: Sequence[int], page_size: int
) -> tuple[list[int], int]:
    """A decode step extends each request by its one position seq_i - 1."""
    return extend_indices_loop([seq - 1 for seq in seq_lens], seq_lens, last_loc, free_pages, page_size)
