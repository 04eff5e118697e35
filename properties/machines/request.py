"""The request-level machines: prefill, chunked continuation, decode, window eviction,
finishing, and (with pages) tail-only SWA admissions, around small pools.

`RequestMachine` holds the rules of every page size and makes its allocations with `alloc`
(page size 1); `PagedRequestMachine` makes them with `alloc_extend` / `alloc_decode` and adds
the paged-only rules. Each page size is a two-line subclass (RequestMachinePS1 ... PS64).
Lengths scale with the page size: the strategies below read it from the running machine
(Hypothesis's `st.runner()`), so a printed program shows plain integers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    consumes,
    initialize,
    multiple,
    precondition,
    rule,
)
from hypothesis.strategies import SearchStrategy

from properties.machines import reach
from properties.machines.base import ENDINGS, AllocatorMachine
from properties.machines.model import Request, ceil_div

T = TypeVar("T")


def per_page_size(build: Callable[[int], SearchStrategy[T]]) -> SearchStrategy[T]:
    """The strategy `build(page_size)` of the machine that draws from it."""
    cached = functools.cache(build)
    return st.runner().flatmap(lambda machine: cached(machine.page_size))


CHUNKS = per_page_size(lambda ps: st.integers(1, 3 * ps + 3))
"""Tokens a prefill chunk adds: up to three pages and a bit."""
WINDOWS = per_page_size(lambda ps: st.integers(1, 3 * ps + 2))
SHORT_OF_PAGE = per_page_size(lambda ps: st.integers(0, ps - 1))
TAILS = per_page_size(lambda ps: st.integers(0, 3 * ps + 3))
"""alloc_extend_swa_tail's tail (capped at the extension's length): from 0, at every offset."""
PAGE_OFFSETS = per_page_size(lambda ps: st.frozensets(st.integers(0, ps - 1), min_size=1, max_size=ps - 1))
"""Some, not all, of a page's token offsets (page size > 1)."""
POOLS = st.sampled_from(("full", "swa"))


class RequestMachine(AllocatorMachine):
    """Requests at page size 1: every allocation is one `alloc` of the batch's new tokens."""

    page_size = 1
    requests = Bundle("requests")
    handles: dict[int, Request]
    window: int

    @initialize(pages=st.integers(2, 16), swa_pages=st.integers(1, 16), need_sort=st.booleans(), window=WINDOWS)
    def setup(self, pages: int, swa_pages: int, need_sort: bool, window: int) -> None:
        ps = self.page_size
        self.start(pages * ps, swa_pages * ps, ps, need_sort)
        self.window = window

    def live_tokens(self) -> set[int]:
        return {token for request in self.handles.values() for token in request.tokens}

    def live_requests(self) -> list[Request]:
        return list(self.handles.values())

    def live(self, handles: list[int]) -> list[Request]:
        """The requests behind `handles` that are still live and can grow, each once."""
        return [self.handles[h] for h in dict.fromkeys(handles) if h in self.handles and self.can_grow(self.handles[h])]

    def can_grow(self, request: Request) -> bool:
        """Whether the request may be extended: its last token has the SWA peer that the SWA
        side continues from (after a tail of 0 it has none: its translated last_loc, 0, fails
        the contiguity precondition on the SWA pool)."""
        return not request.tokens or self.model.translate(request.last_loc) > 0

    def has_requests(self) -> bool:
        """A rule drawing a list of requests needs one to draw (Hypothesis checks only plain
        bundle arguments), else its example is thrown away."""
        return bool(self.bundle("requests"))

    # ------------------------------------------------------------ allocations
    def extend(self, requests: list[Request], lengths: list[int]) -> bool:
        """One allocation that extends each request by its length; False if it failed."""
        slots = self.allocate_extend(requests, lengths, self.live_tokens())
        if slots is None:
            return False
        for request, length in zip(requests, lengths):
            request.tokens += slots[:length]
            slots = slots[length:]
        return True

    def allocate_extend(self, requests: list[Request], lengths: list[int], live_before: set[int]) -> list[int] | None:
        need = sum(lengths)
        return self.allocate("alloc", (need,), self.model.alloc(need), live_before)

    def decode_batch(self, live: list[Request]) -> None:
        """One decode step: a token for each request."""
        if live:
            self.extend(live, [1] * len(live))

    def evict(self, request: Request, short: int) -> None:
        """free_swa of the tokens the window has left behind (page-floored), stopping `short`
        tokens before the boundary if that still names some."""
        boundary = request.evict_boundary(self.window, self.page_size)
        if boundary <= request.evict_floor:
            return
        event("window slide freed SWA slots")
        end = boundary - short if boundary - short > request.evict_floor else boundary
        self.release("free_swa", request.tokens[request.evict_floor : end])
        request.evict_floor = boundary

    # ------------------------------------------------------------------ rules
    @rule(target=requests, lengths=st.lists(CHUNKS, min_size=1, max_size=3))
    def admit(self, lengths: list[int]) -> MultipleResults[int]:
        """New requests' prefill, batched in one allocation."""
        fresh = [Request([]) for _ in lengths]
        if not self.extend(fresh, lengths):
            return multiple()
        return multiple(*(self.new_handle(request) for request in fresh))

    @rule(target=requests, pick=requests, chunk=CHUNKS, lengths=st.lists(CHUNKS, min_size=1, max_size=2))
    def prefill_with_chunk(self, pick: int, chunk: int, lengths: list[int]) -> MultipleResults[int]:
        """A prefill batch as a scheduler forms it: the next chunk of a request whose prefix
        is cached, then new requests, in one allocation."""
        chunked = self.live([pick])
        fresh = [Request([]) for _ in lengths]
        if not self.extend(chunked + fresh, [chunk] * len(chunked) + lengths):
            return multiple()
        return multiple(*(self.new_handle(request) for request in fresh))

    @precondition(has_requests)
    @rule(picks=st.lists(requests, min_size=1, max_size=3), lengths=st.lists(CHUNKS, min_size=3, max_size=3))
    def continue_prefill(self, picks: list[int], lengths: list[int]) -> None:
        """Chunked prefill: extend live requests whose prefix is already cached."""
        live = self.live(picks)
        if live:
            self.extend(live, lengths[: len(live)])

    @rule()
    def batch_decode(self) -> None:
        """A scheduler step: every live request's window slides, then the whole running
        batch decodes one token."""
        for request in list(self.handles.values()):
            self.evict(request, 0)
        self.decode_batch([request for request in self.handles.values() if self.can_grow(request)])

    @precondition(has_requests)
    @rule(picks=st.lists(requests, min_size=1, max_size=4))
    def decode(self, picks: list[int]) -> None:
        """One decode step for a batch of live requests."""
        self.decode_batch(self.live(picks))

    @rule(pick=requests, short=SHORT_OF_PAGE)
    def evict_window(self, pick: int, short: int) -> None:
        """Release the SWA slots the sliding window has left behind (page-floored). The span
        may stop `short` tokens before the boundary: free_swa must round it up to the
        whole page, as the SPEC says."""
        request = self.handles.get(pick)
        if request is not None:
            self.evict(request, short)

    @rule(pick=consumes(requests), ending=st.sampled_from(ENDINGS))
    def finish(self, pick: int, ending: str) -> None:
        """A request ends (ENDINGS says how)."""
        request = self.handles.pop(pick, None)
        if request is not None and request.tokens:
            self.end_tokens(request.tokens, request.evict_floor, ending)

    @rule(target=requests, pool=POOLS, short=SHORT_OF_PAGE)
    def admit_filling_pool(self, pool: str, short: int) -> int | MultipleResults[int]:
        """Admit one request as long as `pool`'s free space, less `short` tokens of its last
        page: the allocation takes every free page of that pool if the other can serve it."""
        length = getattr(self.model, pool).available() - short
        request = Request([])
        if length <= 0 or not self.extend([request], [length]):
            return multiple()
        return self.new_handle(request)


class PagedRequestMachine(RequestMachine):
    """Requests at page size > 1: alloc_extend, alloc_decode, and tail-only SWA admissions."""

    def allocate_extend(self, requests: list[Request], lengths: list[int], live_before: set[int]) -> list[int] | None:
        prefix = [r.seq_len for r in requests]
        seq = [p + n for p, n in zip(prefix, lengths)]
        last = [r.last_loc for r in requests]
        args = (prefix, prefix, seq, seq, last, sum(lengths))
        return self.allocate("alloc_extend", args, self.model.alloc_extend(prefix, seq, last), live_before)

    def decode_batch(self, live: list[Request]) -> None:
        if not live:
            return
        ps = self.page_size
        seq = [r.seq_len + 1 for r in live]
        last = [r.last_loc for r in live]
        new_pages = sum(1 for length in seq if (length - 1) % ps == 0)
        if not self.allows("decode_without_capacity") and new_pages * ps > self.model.available():
            event("decode left out: the capacity pre-check fails")
            return
        live_before = self.live_tokens()
        slots = self.allocate("alloc_decode", (seq, seq, last), self.model.alloc_decode(seq, last), live_before)
        for request, slot in zip(live, slots or ()):
            request.tokens.append(slot)

    def extend_tail(self, request: Request, length: int, tail: int) -> bool:
        """Extend by `length` tokens, SWA slots only for the last `tail` (at most `length`).
        A contract that wants the tail page aligned gets one covering the window too, its
        start floored to a page (or moved up to the first page boundary past the prefix).
        False: no call, or it failed."""
        ps = self.page_size
        prefix, seq, last = request.seq_len, request.seq_len + length, request.last_loc
        tail = min(tail, length)
        if not self.allows("unaligned_swa_tail"):
            in_window = min(self.window, length)
            start = (seq - max(tail, in_window)) // ps * ps
            if start < prefix:
                start = ceil_div(prefix, ps) * ps
            if start > seq - in_window:
                event("tail-only extend left out: no page boundary lets the tail cover the window")
                return False
            tail = seq - start
        live_before = self.live_tokens()
        expected = self.model.alloc_extend_swa_tail(prefix, seq, last, tail)
        args = ([prefix], [prefix], [seq], [seq], [last], length, tail)
        slots = self.allocate("alloc_extend_swa_tail", args, expected, live_before)
        event(reach.labelled(reach.SWA_TAIL_LENGTH, tail if tail <= ps else "over a page"))
        event(reach.labelled(reach.SWA_TAIL_OFFSET, (seq - tail) % ps))
        if slots is None:
            return False
        if prefix == 0:
            request.evict_floor = (seq - tail) // ps * ps
        if tail < length:
            request.swa_from = seq - tail
        request.tokens += slots
        return True

    @precondition(lambda self: self.allows("swa_tail"))
    @rule(target=RequestMachine.requests, length=CHUNKS, tail=TAILS)
    def admit_swa_tail(self, length: int, tail: int) -> int | MultipleResults[int]:
        """Admit a request whose SWA slots cover only its last `tail` tokens."""
        request = Request([])
        if not self.extend_tail(request, length, tail):
            return multiple()
        return self.new_handle(request)

    @precondition(lambda self: self.allows("swa_tail"))
    @rule(pick=RequestMachine.requests, length=CHUNKS, tail=TAILS)
    def continue_prefill_swa_tail(self, pick: int, length: int, tail: int) -> None:
        """The next chunk of a live request, with SWA slots only for its last `tail` tokens."""
        request = self.handles.get(pick)
        if request is not None and self.can_grow(request):
            self.extend_tail(request, length, tail)

    @rule(pick=consumes(RequestMachine.requests), ending=st.sampled_from(ENDINGS), offsets=PAGE_OFFSETS)
    def finish_naming_part_of_pages(self, pick: int, ending: str, offsets: frozenset[int]) -> None:
        """A request ends (ENDINGS says how) with calls that name, of each page, only the
        tokens at `offsets`: freeing any token of a page frees all of it (SPEC §1.2), and
        free_swa zeroes the whole page's mapping (§1.3)."""
        request = self.handles.pop(pick, None)
        if request is not None and request.tokens:
            self.end_tokens(request.tokens, request.evict_floor, ending, offsets)


class RequestMachinePS1(RequestMachine):
    page_size = 1


class RequestMachinePS2(PagedRequestMachine):
    page_size = 2


class RequestMachinePS4(PagedRequestMachine):
    page_size = 4


class RequestMachinePS16(PagedRequestMachine):
    page_size = 16


class RequestMachinePS64(PagedRequestMachine):
    page_size = 64


REQUEST_MACHINES: tuple[type[RequestMachine], ...] = (
    RequestMachinePS1,
    RequestMachinePS2,
    RequestMachinePS4,
    RequestMachinePS16,
    RequestMachinePS64,
)
