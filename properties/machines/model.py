"""A pure-Python reference model of the SWA allocator's state (SPEC §1), and of live requests.

No torch: every list here is a plain list of ints, so the model is obviously right by reading
it, and the state machines compare the real allocator with it after every step.

Pool data structures (units are slots at page size 1, pages otherwise):
  free       ready units, handed out from the front;
  staged     with need_sort, freed units waiting for a merge;
  allocated  units handed out and not yet freed;
  pending    while a free group is open, the units freed inside it, in call order.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@functools.lru_cache(maxsize=8)
def every_unit(num_units: int) -> tuple[int, ...]:
    """Units 1..num_units (a list copied from this is 6x faster than one built from a range)."""
    return tuple(range(1, num_units + 1))


def unique_in_order(values: list[int]) -> list[int]:
    return list(dict.fromkeys(values))


@dataclass
class PoolModel:
    num_units: int
    page_size: int
    need_sort: bool
    free: list[int] = field(default_factory=list)
    staged: list[int] = field(default_factory=list)
    allocated: set[int] = field(default_factory=set)
    pending: list[int] | None = None

    def __post_init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.free = list(every_unit(self.num_units))
        self.staged = []
        self.allocated = set()
        self.pending = None

    @property
    def paged(self) -> bool:
        return self.page_size > 1

    def available(self) -> int:
        return (len(self.free) + len(self.staged)) * self.page_size

    def all_free(self) -> list[int]:
        """What get_all_free_pages() returns: ready units, then staged ones."""
        return self.free + self.staged

    def can_serve(self, units: int) -> bool:
        return units <= len(self.free) + len(self.staged)

    def reserve(self, units: int, merge_threshold: int) -> bool:
        if self.need_sort and merge_threshold > len(self.free):
            self.free = sorted(self.free + self.staged)
            self.staged = []
        return units <= len(self.free)

    def take(self, units: int) -> list[int]:
        taken = self.free[:units]
        del self.free[:units]  # in place: a copy of the rest would cost the pool's size
        self.allocated.update(taken)
        return taken

    def units_of(self, tokens: list[int]) -> list[int]:
        if self.paged:
            return sorted({token // self.page_size for token in tokens})
        return list(tokens)

    def release(self, units: list[int]) -> None:
        if not units:
            return
        self.allocated.difference_update(units)
        if self.pending is not None:
            self.pending.extend(units)
        else:
            self.give_back(units)

    def give_back(self, units: list[int]) -> None:
        if self.paged:
            units = sorted(set(units))
            if self.need_sort:
                self.staged[:0] = units
            else:
                self.free[:0] = units
        elif self.need_sort:
            self.staged += units
        else:
            self.free += units

    def group_begin(self) -> None:
        self.pending = []

    def group_end(self) -> None:
        pending, self.pending = self.pending or [], None
        if pending:
            self.give_back(unique_in_order(pending))

    def copy(self) -> PoolModel:
        twin = copy.copy(self)
        twin.free, twin.staged, twin.allocated = list(self.free), list(self.staged), set(self.allocated)
        twin.pending = None if self.pending is None else list(self.pending)
        return twin

    def tokens_of(self, unit: int) -> list[int]:
        return [unit * self.page_size + offset for offset in range(self.page_size)]


@dataclass
class SWAModel:
    """The whole allocator: two pools and the nonzero part of the mapping."""

    size: int
    size_swa: int
    page_size: int
    need_sort: bool
    full: PoolModel = field(init=False)
    swa: PoolModel = field(init=False)
    mapping: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.full = PoolModel(self.size // self.page_size, self.page_size, self.need_sort)
        self.swa = PoolModel(self.size_swa // self.page_size, self.page_size, self.need_sort)

    def config(self) -> dict:
        return {"size": self.size, "size_swa": self.size_swa, "page_size": self.page_size, "need_sort": self.need_sort}

    @property
    def mapping_len(self) -> int:
        return self.size + self.page_size + 1

    def dense_mapping(self) -> list[int]:
        dense = [0] * self.mapping_len
        for full_slot, swa_slot in self.mapping.items():
            dense[full_slot] = swa_slot
        dense[-1] = -1
        return dense

    def available(self) -> int:
        return min(self.full.available(), self.swa.available())

    def snapshot(self) -> SWAModel:
        """An independent copy (the state holds only ints: copying each container is enough,
        and costs a fraction of a deepcopy on large pools)."""
        twin = copy.copy(self)
        twin.full, twin.swa, twin.mapping = self.full.copy(), self.swa.copy(), dict(self.mapping)
        return twin

    def clear(self) -> None:
        self.full.clear()
        self.swa.clear()
        self.mapping.clear()

    # ------------------------------------------------------------ allocation
    def alloc(self, need: int) -> list[int] | None:
        if not (self.full.can_serve(need) and self.swa.can_serve(need)):
            return None
        self.full.reserve(need, need)
        self.swa.reserve(need, need)
        full_slots, swa_slots = self.full.take(need), self.swa.take(need)
        self.mapping.update(zip(full_slots, swa_slots))
        return full_slots

    def alloc_extend(self, prefix_lens: list[int], seq_lens: list[int], last_locs: list[int]) -> list[int] | None:
        swa_last_locs = [self.translate(loc) for loc in last_locs]
        full_plan = self._extend_plan(prefix_lens, seq_lens)
        if not (self.full.can_serve(full_plan) and self.swa.can_serve(full_plan)):
            return None
        tokens = sum(seq - prefix for prefix, seq in zip(prefix_lens, seq_lens))
        threshold = tokens // self.page_size + len(seq_lens) + 1
        full_slots = self._extend(self.full, prefix_lens, seq_lens, last_locs, threshold)
        swa_slots = self._extend(self.swa, prefix_lens, seq_lens, swa_last_locs, threshold)
        self.mapping.update(zip(full_slots, swa_slots))
        return full_slots

    def alloc_decode(self, seq_lens: list[int], last_locs: list[int]) -> list[int] | None:
        prefix_lens = [seq - 1 for seq in seq_lens]
        swa_last_locs = [self.translate(loc) for loc in last_locs]
        needed = self._extend_plan(prefix_lens, seq_lens)
        if not (self.full.can_serve(needed) and self.swa.can_serve(needed)):
            return None
        full_slots = self._extend(self.full, prefix_lens, seq_lens, last_locs, len(seq_lens))
        swa_slots = self._extend(self.swa, prefix_lens, seq_lens, swa_last_locs, len(seq_lens))
        self.mapping.update(zip(full_slots, swa_slots))
        return full_slots

    def alloc_extend_swa_tail(self, prefix: int, seq: int, last_loc: int, tail: int) -> list[int] | None:
        ps = self.page_size
        tail_start = seq - tail
        swa_prefix, swa_last = tail_start // ps * ps, -1
        if prefix % ps and tail_start // ps == prefix // ps and self.translate(last_loc) > 0:
            swa_prefix, swa_last = tail_start, self.translate(last_loc) + tail_start - prefix
        full_pages = self._extend_plan([prefix], [seq])
        swa_pages = self._extend_plan([swa_prefix], [seq]) if tail else 0
        if not (self.full.can_serve(full_pages) and self.swa.can_serve(swa_pages)):
            return None
        full_slots = self._extend(self.full, [prefix], [seq], [last_loc], (seq - prefix) // ps + 2)
        for slot in full_slots:
            self.mapping.pop(slot, None)
        if tail:
            swa_slots = self._extend(self.swa, [swa_prefix], [seq], [swa_last], (seq - swa_prefix) // ps + 2)
            self.mapping.update(zip(full_slots[-tail:], swa_slots[-tail:]))
        return full_slots

    def _extend_plan(self, prefix_lens: list[int], seq_lens: list[int]) -> int:
        """New units an extension needs."""
        ps = self.page_size
        return sum(ceil_div(seq, ps) - ceil_div(prefix, ps) for prefix, seq in zip(prefix_lens, seq_lens))

    def _extend(
        self, pool: PoolModel, prefix_lens: list[int], seq_lens: list[int], last_locs: list[int], merge_threshold: int
    ) -> list[int]:
        """Token by token: finish the current page after last_loc, then fill fresh pages."""
        ps = self.page_size
        pool.reserve(self._extend_plan(prefix_lens, seq_lens), merge_threshold)
        slots: list[int] = []
        for prefix, seq, last_loc in zip(prefix_lens, seq_lens, last_locs):
            current = last_loc
            for position in range(prefix, seq):
                if position % ps == 0:
                    current = pool.take(1)[0] * ps
                else:
                    current += 1
                slots.append(current)
        return slots

    def translate(self, full_slot: int) -> int:
        return -1 if full_slot == -1 else self.mapping.get(full_slot, 0)

    # ----------------------------------------------------------------- frees
    def free_swa(self, tokens: list[int]) -> None:
        if self.full.paged:
            tokens = [t for page in self.full.units_of(tokens) for t in self.full.tokens_of(page)]
        peers = [self.mapping.pop(token) for token in tokens if token in self.mapping]
        self.swa.release(self.swa.units_of(peers))

    def free_full(self, tokens: list[int]) -> None:
        self.full.release(self.full.units_of(tokens))

    def free(self, tokens: list[int]) -> None:
        self.free_swa(tokens)
        self.free_full(tokens)

    def group_begin(self) -> None:
        self.full.group_begin()
        self.swa.group_begin()

    def group_end(self) -> None:
        self.full.group_end()
        self.swa.group_end()

    @property
    def in_group(self) -> bool:
        return self.full.pending is not None


@dataclass
class Request:
    """A live request: the full slot of each position, how far the window has evicted, and
    where its SWA slots start after a tail-only extension that left the positions before
    `swa_from` without SWA slots (a tail shorter than the window)."""

    tokens: list[int]
    evict_floor: int = 0
    swa_from: int = 0

    @property
    def seq_len(self) -> int:
        return len(self.tokens)

    @property
    def last_loc(self) -> int:
        return self.tokens[-1] if self.tokens else -1

    def window_start(self, window: int) -> int:
        """First position of the sliding window."""
        return max(0, self.seq_len - window)

    def needs_swa_from(self, window: int) -> int:
        """First position that must hold an SWA slot: the window's, or later where a tail-only
        extension gave SWA slots to fewer tokens than the window spans."""
        return max(self.window_start(window), self.swa_from)

    def evict_boundary(self, window: int, page_size: int) -> int:
        """Positions before this may be released with free_swa (window start, floored to a page)."""
        return self.window_start(window) // page_size * page_size
