"""Hypothesis state machines that drive an allocator through random programs.

Each machine owns one allocator (built by its target factory), a reference `SWAModel` and
the live holdings or requests. Contract of every rule: it makes at most one allocation call,
updates the model the same way, and records what the model expects; the invariant that runs
after every rule reads the allocator back once and checks it (properties/checks.py).

Bundles hold integer handles, never tensors, so a failing program prints as Python that
reproduces it. A handle whose holding is gone (freed, cleared, rolled back) makes its rule a
no-op rather than an error, which keeps shrinking free to drop any step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from canary.invariants import InvariantViolation
from properties.machines.driver import AllocatorDriver
from properties.machines.model import Request, SWAModel, ceil_div
from properties.machines.step_checks import Expectation, Observed, check_step, observe
from properties.targets import (
    SPEC_CONTRACT,
    AllocatorConfig,
    Factory,
    Target,
    TargetContract,
    as_target,
    reference_factory,
)

REQUEST_PAGE_SIZES = (1, 2, 4, 16, 64)

# How a request (or a holding) ends: free of every token; free_swa of the tokens that still
# hold SWA peers, then free_full of every token; free_full of the tokens whose peers the
# window already released, then free of the rest (sglang's scheduler).
ENDINGS = ("free", "free_swa_then_full", "free_full_then_free")


@dataclass
class Holding:
    """Slots from one `alloc`; the first `swa_released` of them have had their SWA peers freed."""

    tokens: list[int]
    swa_released: int = 0


class AllocatorMachine(RuleBasedStateMachine):
    """Rules shared by every machine: free groups, backup/restore, clear, and the step check."""

    factory: Factory = staticmethod(reference_factory)
    contract: TargetContract = SPEC_CONTRACT
    """The calls this target accepts (properties/targets.py); rules leave out what it restricts."""
    device: str = "cpu"
    stats = None  # a properties.check.Stats shared by one check's machines, or None
    backups = Bundle("backups")

    def __init__(self) -> None:
        super().__init__()
        self.allocator = None
        self.window: int | None = None

    def start(self, size: int, size_swa: int, page_size: int, need_sort: bool) -> None:
        self.model = SWAModel(size, size_swa, page_size, need_sort)
        calls: list[dict] = []
        if self.stats is not None:
            # Recorded before the factory runs: a target that fails to construct still leaves
            # this program's config, not the previous program's.
            self.stats.programs += 1
            self.stats.last_program = {"config": self.model.config(), "calls": calls}
        self.allocator = self.factory(AllocatorConfig(size, size_swa, page_size, self.device, need_sort))
        self.driver = AllocatorDriver(self.allocator, self.device, calls)
        self.handles: dict[int, object] = {}
        self.next_handle = 0
        self.saved: dict[int, tuple[SWAModel, dict, object]] = {}
        self.result = None
        self.expectation = Expectation("__init__")
        self.previous: Observed | None = None

    # ------------------------------------------------------------ the step
    def allocate(self, method: str, args: tuple, expected: list[int] | None, live_before: set[int]) -> list[int] | None:
        """Make one allocation call whose model outcome is `expected` (None: must fail)."""
        if self.expectation.call != "(no call)":
            # A release earlier in this rule changed the state: a failed allocation must
            # leave it as it was right before the allocation.
            self.previous = observe(self.allocator, None)
        self.result = self.driver.call(method, *args)
        self.expectation = Expectation(method, expected, True, live_before)
        if expected is None:
            full, swa = self.model.full.available(), self.model.swa.available()
            event("allocation failed: SWA pool ran out first" if swa < full else "allocation failed: full pool exhausted")
        return expected

    def release(self, method: str, tokens: list[int]) -> None:
        self.driver.call(method, tokens)
        getattr(self.model, method)(tokens)
        self.expectation = Expectation(method)

    def end_tokens(self, tokens: list[int], released: int, ending: str) -> None:
        """Release every slot of a request or holding whose first `released` tokens no longer
        hold SWA peers, the way `ending` (one of ENDINGS) says."""
        if ending == "free" and released and self.model.page_size == 1 and self.contract.free_held_swa_peers_only_at_ps1:
            ending = "free_full_then_free"
        if ending == "free":
            self.release("free", tokens)
        elif ending == "free_swa_then_full":
            self.release("free_swa", tokens[released:])
            self.release("free_full", tokens)
        else:
            self.release("free_full", tokens[:released])
            self.release("free", tokens[released:])

    def new_handle(self, holding: object) -> int:
        self.next_handle += 1
        self.handles[self.next_handle] = holding
        return self.next_handle

    @property
    def can_backup(self) -> bool:
        """backup_state/restore_state are optional: sglang 0.5.23 has neither."""
        return self.allocator is not None and not self.contract.no_backup_restore and hasattr(self.allocator, "backup_state")

    def live_tokens(self) -> set[int]:
        raise NotImplementedError

    def live_requests(self) -> list[Request]:
        return []

    @invariant()
    def allocator_matches_model(self) -> None:
        if self.allocator is None:
            return
        observed = observe(self.allocator, self.result)
        violations = check_step(
            observed, self.previous, self.model, self.expectation, self.live_tokens(), self.live_requests(), self.window
        )
        if self.stats is not None:
            self.stats.steps += 1
            self.stats.calls[self.expectation.call] += 1
        self.previous, self.result, self.expectation = observed, None, Expectation("(no call)")
        if violations:
            raise InvariantViolation(violations)

    # ------------------------------------------------------ shared rules
    @precondition(lambda self: self.allocator is not None and not self.model.in_group)
    @rule()
    def free_group_begin(self) -> None:
        self.driver.call("free_group_begin")
        self.model.group_begin()
        self.expectation = Expectation("free_group_begin")

    @precondition(lambda self: self.allocator is not None and self.model.in_group)
    @rule()
    def free_group_end(self) -> None:
        if self.model.full.pending or self.model.swa.pending:
            event("free group flushed deferred frees")
        self.driver.call("free_group_end")
        self.model.group_end()
        self.expectation = Expectation("free_group_end")

    @precondition(lambda self: self.allocator is not None and not self.contract.free_group_calls_paired)
    @rule()
    def misplaced_free_group_call(self) -> None:
        """A nested free_group_begin, or a free_group_end with no group open, must raise and
        change nothing (a drifting group flag drops or re-releases deferred frees)."""
        call, where = ("free_group_begin", "inside") if self.model.in_group else ("free_group_end", "outside")
        try:
            self.driver.call(call)
        except Exception:  # any error will do: the SPEC names none
            breach = ""
        else:
            breach = f"{call} {where} a free group did not raise"
        self.expectation = Expectation(call, breach=breach)

    @precondition(lambda self: self.can_backup and not self.model.in_group)
    @rule(target=backups)
    def backup_state(self) -> int:
        self.next_handle += 1
        self.driver.call("backup_state", self.next_handle)
        self.saved[self.next_handle] = (self.model.snapshot(), copy.deepcopy(self.handles))
        self.expectation = Expectation("backup_state")
        return self.next_handle

    @precondition(lambda self: self.can_backup and not self.model.in_group)
    @rule(backup=backups)
    def restore_state(self, backup: int) -> None:
        if backup not in self.saved:
            return
        model, handles = self.saved[backup]
        self.driver.call("restore_state", backup)
        self.model, self.handles = copy.deepcopy(model), copy.deepcopy(handles)
        self.expectation = Expectation("restore_state")

    @precondition(lambda self: self.allocator is not None)
    @rule(now=st.integers(0, 3))
    def clear(self, now: int) -> None:
        """Drop everything (an engine's cache flush: rare). Three draws in four skip it, so that
        programs build up deep states; drawn at every step it undid most of them."""
        if now:
            return
        self.driver.call("clear")
        self.model.clear()
        self.handles.clear()
        self.saved.clear()
        self.expectation = Expectation("clear")


class SlotMachine(AllocatorMachine):
    """Page size 1, slot-level calls: alloc, free, free_swa on part of a holding, free_full."""

    holdings = Bundle("holdings")

    @initialize(size=st.integers(1, 24), size_swa=st.integers(1, 24), need_sort=st.booleans())
    def setup(self, size: int, size_swa: int, need_sort: bool) -> None:
        self.start(size, size_swa, 1, need_sort)

    def live_tokens(self) -> set[int]:
        return {token for holding in self.handles.values() for token in holding.tokens}

    @rule(target=holdings, need=st.integers(0, 10))
    def alloc(self, need: int):
        live_before = self.live_tokens()
        slots = self.allocate("alloc", (need,), self.model.alloc(need), live_before)
        return multiple() if slots is None else self.new_handle(Holding(slots))

    @rule(handle=consumes(holdings), ending=st.sampled_from(ENDINGS))
    def finish(self, handle: int, ending: str) -> None:
        """Release the whole holding (ENDINGS says how)."""
        holding = self.handles.pop(handle, None)
        if holding is not None:
            self.end_tokens(holding.tokens, holding.swa_released, ending)

    @rule()
    def advance_windows(self) -> None:
        """Every holding's window slides by one token: one free_swa of each holding's oldest
        SWA peer, batched in one call."""
        oldest = [holding for holding in self.handles.values() if holding.swa_released < len(holding.tokens)]
        if oldest:
            self.release("free_swa", [holding.tokens[holding.swa_released] for holding in oldest])
        for holding in oldest:
            holding.swa_released += 1

    @rule(handle=holdings, count=st.integers(1, 10))
    def free_swa(self, handle: int, count: int) -> None:
        holding = self.handles.get(handle)
        if holding is None:
            return
        span = holding.tokens[holding.swa_released : holding.swa_released + count]
        self.release("free_swa", span)
        holding.swa_released += len(span)


def request_machine(page_size: int) -> type[AllocatorMachine]:
    """The request-level machine at one page size: prefill, chunked continuation, decode,
    window eviction, finishing, tail-only SWA admissions, around small pools."""
    ps = page_size
    paged = ps > 1
    max_chunk = 3 * ps + 3

    class RequestMachine(AllocatorMachine):
        requests = Bundle("requests")

        @initialize(
            pages=st.integers(2, 16),
            swa_pages=st.integers(1, 16),
            need_sort=st.booleans(),
            window=st.integers(1, 3 * ps + 2),
        )
        def setup(self, pages: int, swa_pages: int, need_sort: bool, window: int) -> None:
            self.start(pages * ps, swa_pages * ps, ps, need_sort)
            self.window = window

        def live_tokens(self) -> set[int]:
            return {token for request in self.handles.values() for token in request.tokens}

        def live_requests(self) -> list[Request]:
            return list(self.handles.values())

        def _live(self, handles: list[int]) -> list[Request]:
            return [self.handles[h] for h in dict.fromkeys(handles) if h in self.handles]

        def _extend(self, requests: list[Request], lengths: list[int]) -> bool:
            """One allocation that extends each request by its length; False if it failed."""
            live_before = self.live_tokens()
            prefix = [r.seq_len for r in requests]
            seq = [p + n for p, n in zip(prefix, lengths)]
            last = [r.last_loc for r in requests]
            if paged:
                expected = self.model.alloc_extend(prefix, seq, last)
                args = (prefix, prefix, seq, seq, last, sum(lengths))
                slots = self.allocate("alloc_extend", args, expected, live_before)
            else:
                slots = self.allocate("alloc", (sum(lengths),), self.model.alloc(sum(lengths)), live_before)
            if slots is None:
                return False
            for request, length in zip(requests, lengths):
                request.tokens += slots[:length]
                slots = slots[length:]
            return True

        @rule(target=requests, lengths=st.lists(st.integers(1, max_chunk), min_size=1, max_size=3))
        def admit(self, lengths: list[int]):
            """New requests' prefill, batched in one allocation."""
            fresh = [Request([]) for _ in lengths]
            if not self._extend(fresh, lengths):
                return multiple()
            return multiple(*(self.new_handle(request) for request in fresh))

        @rule(
            target=requests,
            pick=requests,
            chunk=st.integers(1, max_chunk),
            lengths=st.lists(st.integers(1, max_chunk), min_size=1, max_size=2),
        )
        def prefill_with_chunk(self, pick: int, chunk: int, lengths: list[int]):
            """A prefill batch as a scheduler forms it: the next chunk of a request whose prefix
            is cached, then new requests, in one allocation."""
            chunked = self._live([pick])
            fresh = [Request([]) for _ in lengths]
            if not self._extend(chunked + fresh, [chunk] * len(chunked) + lengths):
                return multiple()
            return multiple(*(self.new_handle(request) for request in fresh))

        @rule(picks=st.lists(requests, min_size=1, max_size=3), lengths=st.lists(st.integers(1, max_chunk), min_size=3, max_size=3))
        def continue_prefill(self, picks: list[int], lengths: list[int]) -> None:
            """Chunked prefill: extend live requests whose prefix is already cached."""
            live = self._live(picks)
            if live:
                self._extend(live, lengths[: len(live)])

        @rule()
        def batch_decode(self) -> None:
            """A scheduler step: every live request's window slides, then the whole running
            batch decodes one token."""
            for request in list(self.handles.values()):
                self._evict(request, 0)
            self._decode(list(self.handles.values()))

        @rule(picks=st.lists(requests, min_size=1, max_size=4))
        def decode(self, picks: list[int]) -> None:
            """One decode step for a batch of live requests."""
            self._decode(self._live(picks))

        def _decode(self, live: list[Request]) -> None:
            if not live:
                return
            if not paged:
                self._extend(live, [1] * len(live))
                return
            live_before = self.live_tokens()
            seq = [r.seq_len + 1 for r in live]
            last = [r.last_loc for r in live]
            new_pages = sum(1 for length in seq if (length - 1) % ps == 0)
            if self.contract.decode_capacity_prechecked and new_pages * ps > self.model.available():
                event("decode left out: the capacity pre-check fails")
                return
            slots = self.allocate("alloc_decode", (seq, seq, last), self.model.alloc_decode(seq, last), live_before)
            for request, slot in zip(live, slots or ()):
                request.tokens.append(slot)

        @rule(pick=requests, short=st.integers(0, ps - 1))
        def evict_window(self, pick: int, short: int) -> None:
            """Release the SWA slots the sliding window has left behind (page-floored). The span
            may stop `short` tokens before the boundary: free_swa must round it up to the
            whole page, as the SPEC says."""
            request = self.handles.get(pick)
            if request is not None:
                self._evict(request, short)

        def _evict(self, request: Request, short: int) -> None:
            boundary = request.evict_boundary(self.window, ps)
            if boundary <= request.evict_floor:
                return
            event("window slide freed SWA slots")
            end = boundary - short if boundary - short > request.evict_floor else boundary
            self.release("free_swa", request.tokens[request.evict_floor : end])
            request.evict_floor = boundary

        @rule(pick=consumes(requests), ending=st.sampled_from(ENDINGS))
        def finish(self, pick: int, ending: str) -> None:
            """A request ends (ENDINGS says how)."""
            request = self.handles.pop(pick, None)
            if request is not None and request.tokens:
                self.end_tokens(request.tokens, request.evict_floor, ending)

        if paged:

            @rule(target=requests, length=st.integers(1, max_chunk), slack=st.integers(0, 2 * ps))
            def admit_swa_tail(self, length: int, slack: int):
                """Admit a request whose SWA slots cover only its window tail."""
                request = Request([])
                if not self._extend_tail(request, length, slack):
                    return multiple()
                return self.new_handle(request)

            @rule(pick=requests, length=st.integers(1, max_chunk), slack=st.integers(0, 2 * ps))
            def continue_prefill_swa_tail(self, pick: int, length: int, slack: int) -> None:
                request = self.handles.get(pick)
                if request is not None:
                    self._extend_tail(request, length, slack)

            def _extend_tail(self, request: Request, length: int, slack: int) -> bool:
                """Extend by `length` tokens with SWA slots for the window and `slack` more; a
                contract that wants the tail page aligned gets its start floored to a page (or
                moved up to the first page boundary past the prefix). False: no call, or it failed."""
                prefix, seq, last = request.seq_len, request.seq_len + length, request.last_loc
                in_window = min(self.window, length)
                tail = min(length, in_window + slack)
                if self.contract.swa_tail_page_aligned:
                    start = (seq - tail) // ps * ps
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
                if slots is None:
                    return False
                if prefix == 0:
                    request.evict_floor = (seq - tail) // ps * ps
                request.tokens += slots
                return True

    RequestMachine.__name__ = RequestMachine.__qualname__ = f"RequestMachinePS{ps}"
    return RequestMachine


MACHINES: dict[str, type[AllocatorMachine]] = {"SlotMachine": SlotMachine}
MACHINES.update({f"RequestMachinePS{ps}": request_machine(ps) for ps in REQUEST_PAGE_SIZES})


def machine_classes(
    target: str | Factory | Target = "reference", device: str = "cpu"
) -> dict[str, type[AllocatorMachine]]:
    """Every machine, bound to one target (a spec, a factory or a Target, with its contract)
    and device."""
    bound = as_target(target)
    return {
        name: type(name, (machine,), {"factory": staticmethod(bound.factory), "contract": bound.contract, "device": device})
        for name, machine in MACHINES.items()
    }
