"""Paged allocator (page size > 1): one unit is a page of `page_size` consecutive slots.

Token t lives on page t // page_size. A request's tokens fill its pages in position order, so
an extension first finishes the request's current partial page, then takes whole new pages,
then at most one partly used new page. Both allocation paths are vectorised: no Python loop
over requests or tokens, and no host synchronisation beyond input validation.
"""

from __future__ import annotations

import torch

from allocator.errors import ContiguityError, InvalidIndexError
from allocator.free_list import FreeListAllocator, Reservation
from allocator.validation import check_count, check_range, check_vector


def pages_spanned(lengths: torch.Tensor, page_size: int) -> torch.Tensor:
    """ceil(lengths / page_size): the pages a request of that length occupies."""
    return (lengths + page_size - 1) // page_size


def _with_padding_slot(pages: torch.Tensor) -> torch.Tensor:
    """`pages` plus one trailing 0, so clamped gathers stay in range even with no new pages."""
    return torch.cat((pages, pages.new_zeros(1)))


def extend_indices(
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    last_loc: torch.Tensor,
    new_pages: torch.Tensor,
    extend_num_tokens: int,
    page_size: int,
) -> torch.Tensor:
    """Token indices for positions prefix_i .. seq_i - 1 of every request, concatenated.

    Positions on the request's current page continue after last_loc; the others land on
    `new_pages`, which are consumed in request order, each request's pages in position order.
    """
    device = prefix_lens.device
    extend_lens = seq_lens - prefix_lens
    pages_before = pages_spanned(prefix_lens, page_size)
    pages_needed = pages_spanned(seq_lens, page_size) - pages_before
    first_page_slot = torch.cumsum(pages_needed, 0) - pages_needed
    first_output = torch.cumsum(extend_lens, 0) - extend_lens

    # searchsorted rather than repeat_interleave: no host sync on CUDA, and fast on CPU.
    output = torch.arange(extend_num_tokens, device=device)
    request = torch.searchsorted(first_output + extend_lens, output, right=True)
    position = prefix_lens[request] + output - first_output[request]
    on_current_page = position < pages_before[request] * page_size
    page_slot = first_page_slot[request] + position // page_size - pages_before[request]
    page_slot = page_slot.clamp(0, new_pages.numel())
    on_new_page = _with_padding_slot(new_pages)[page_slot] * page_size + position % page_size
    continued = last_loc[request] + 1 + position - prefix_lens[request]
    return torch.where(on_current_page, continued, on_new_page)


def decode_indices(
    seq_lens: torch.Tensor, last_loc: torch.Tensor, new_pages: torch.Tensor, page_size: int
) -> torch.Tensor:
    """One token per request at position seq_i - 1: a new page's first slot at a page start."""
    starts_page = (seq_lens - 1) % page_size == 0
    page_slot = (torch.cumsum(starts_page, 0) - starts_page.long()).clamp(0, new_pages.numel())
    on_new_page = _with_padding_slot(new_pages)[page_slot] * page_size
    return torch.where(starts_page, on_new_page, last_loc + 1)


class PagedTokenToKVPoolAllocator(FreeListAllocator):
    """Pages 1..size // page_size. Freed pages go to the FRONT of the free list (unique,
    ascending), or are staged with need_sort."""

    unit_name = "page"

    def alloc(self, need_size: int) -> torch.Tensor | None:
        """Whole pages for `need_size` tokens (a multiple of page_size), or None."""
        need_size = check_count("need_size", need_size)
        if need_size % self.page_size:
            raise InvalidIndexError(f"need_size={need_size} is not a multiple of page_size={self.page_size}")
        pages = need_size // self.page_size
        offsets = torch.arange(self.page_size, device=self.device)

        def build(free_pages: torch.Tensor) -> torch.Tensor:
            return (free_pages[:pages, None] * self.page_size + offsets).reshape(-1)

        return self.allocate(Reservation(pages, pages, build))

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
    ) -> torch.Tensor | None:
        """Slots for positions prefix_i .. seq_i - 1 of each request (SPEC §1.2), or None."""
        return self.allocate(
            self.reserve_extend(prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens)
        )

    def alloc_decode(
        self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, last_loc: torch.Tensor
    ) -> torch.Tensor | None:
        """One slot per request for position seq_i - 1 (seq_lens are the lengths after the step)."""
        return self.allocate(self.reserve_decode(seq_lens, seq_lens_cpu, last_loc))

    # ------------------------------------------------------------ reservations
    def reserve_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
    ) -> Reservation:
        """Validate an extension and describe it, without changing anything."""
        batch = self._check_lengths(prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc)
        extend_num_tokens = check_count("extend_num_tokens", extend_num_tokens)
        expected = int((seq_lens_cpu - prefix_lens_cpu).sum())
        if extend_num_tokens != expected:
            raise InvalidIndexError(
                f"extend_num_tokens={extend_num_tokens} but seq_lens - prefix_lens sums to {expected}"
            )
        self.check_continuation(prefix_lens, last_loc)
        pages = int(
            (pages_spanned(seq_lens_cpu, self.page_size) - pages_spanned(prefix_lens_cpu, self.page_size)).sum()
        )
        page_size = self.page_size

        def build(free_pages: torch.Tensor) -> torch.Tensor:
            return extend_indices(prefix_lens, seq_lens, last_loc, free_pages[:pages], extend_num_tokens, page_size)

        return Reservation(pages, extend_num_tokens // page_size + batch + 1, build)

    def reserve_decode(self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, last_loc: torch.Tensor) -> Reservation:
        check_vector("seq_lens", seq_lens, self.device)
        check_vector("seq_lens_cpu", seq_lens_cpu, torch.device("cpu"))
        if seq_lens_cpu.numel() and int(seq_lens_cpu.min()) < 1:
            raise InvalidIndexError("every seq_len of a decode must be >= 1 (the length after the step)")
        batch = self._check_lengths(seq_lens - 1, seq_lens_cpu - 1, seq_lens, seq_lens_cpu, last_loc)
        self.check_continuation(seq_lens - 1, last_loc)
        pages = int(((seq_lens_cpu - 1) % self.page_size == 0).sum())
        page_size = self.page_size

        def build(free_pages: torch.Tensor) -> torch.Tensor:
            return decode_indices(seq_lens, last_loc, free_pages[:pages], page_size)

        return Reservation(pages, batch, build)

    # -------------------------------------------------------------- validation
    def _check_lengths(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
    ) -> int:
        batch = check_vector("seq_lens", seq_lens, self.device).numel()
        check_vector("prefix_lens", prefix_lens, self.device, batch)
        check_vector("last_loc", last_loc, self.device, batch)
        cpu = torch.device("cpu")
        check_vector("prefix_lens_cpu", prefix_lens_cpu, cpu, batch)
        check_vector("seq_lens_cpu", seq_lens_cpu, cpu, batch)
        if batch == 0:
            return 0
        if int(prefix_lens_cpu.min()) < 0:
            raise InvalidIndexError("prefix_lens must be >= 0")
        if bool((seq_lens_cpu < prefix_lens_cpu).any()):
            raise InvalidIndexError("every seq_len must be >= its prefix_len")
        if not (torch.equal(prefix_lens.cpu(), prefix_lens_cpu) and torch.equal(seq_lens.cpu(), seq_lens_cpu)):
            raise InvalidIndexError("the device and CPU copies of prefix_lens / seq_lens differ")
        return batch

    def check_continuation(self, prefix_lens: torch.Tensor, last_loc: torch.Tensor) -> None:
        """last_loc must continue the request's current page: (last_loc + 1) % ps == prefix % ps,
        and a partly filled page must be a real, allocated page (never the padding page)."""
        if prefix_lens.numel() == 0:
            return
        check_range("last_loc", last_loc, -1, self.index_limit)
        if bool(((last_loc + 1) % self.page_size != prefix_lens % self.page_size).any()):
            raise ContiguityError(
                f"last_loc {last_loc.tolist()[:16]} does not continue prefix_lens {prefix_lens.tolist()[:16]} "
                f"at page_size {self.page_size}"
            )
        mid_page = prefix_lens % self.page_size != 0
        current_page = torch.where(mid_page, last_loc // self.page_size, 1)
        if bool((current_page < 1).any()):
            raise InvalidIndexError("last_loc of a partly filled page points into the padding page")
        if self.allocated is not None and not bool((self.allocated[current_page] | ~mid_page).all()):
            raise InvalidIndexError("last_loc points into a page that is not allocated")

    # ------------------------------------------------------------------ frees
    def units_of(self, free_index: torch.Tensor) -> torch.Tensor:
        return torch.unique(free_index // self.page_size)

    def deduplicate(self, units: torch.Tensor) -> torch.Tensor:
        return torch.unique(units)

    def return_units(self, units: torch.Tensor) -> None:
        if self.need_sort:
            self.release_pages = torch.cat((units, self.release_pages))
        else:
            self.free_pages = torch.cat((units, self.free_pages))
