"""The machine every other one extends: one allocator, its reference model, the step check,
and the rules every page size shares (free groups, backup/restore, clear).

Contract of every rule: it makes at most one allocation call, updates the model the same way,
and records what the model expects; the invariant that runs after every rule reads the
allocator back once and checks it (properties/machines/step_checks.py).

Bundles hold integer handles, never tensors, so a failing program prints as Python that
reproduces it. A handle whose holding is gone (freed, cleared, rolled back) makes its rule a
no-op rather than an error, which keeps shrinking free to drop any step.

Which calls a rule may make is asked in one place, `AllocatorMachine.allows`: a call pattern
(CALL_PATTERNS) is left out when the target's contract restricts it or the allocator lacks a
method it needs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from allocator.interface import SWAAllocator
from canary.invariants import InvariantViolation
from properties.machines import reach
from properties.machines.driver import AllocatorDriver
from properties.machines.incremental import StepCheck
from properties.machines.masking import FindingMask
from properties.machines.model import Request, SWAModel
from properties.machines.step_checks import Expectation, observe, state_differences
from properties.targets import (
    FULL_CAPABILITIES,
    SPEC_CONTRACT,
    AllocatorConfig,
    Factory,
    TargetCapabilities,
    TargetContract,
    reference_factory,
)

# How a request (or a holding) ends: free of every token; free_swa of the tokens that still
# hold SWA peers, then free_full of every token; free_full of the tokens whose peers the
# window already released, then free of the rest (sglang's scheduler).
ENDINGS = ("free", "free_swa_then_full", "free_full_then_free")


@dataclass(frozen=True)
class CallPattern:
    """A kind of call a rule makes: the allocator methods it needs, the contract flag
    (properties/targets TargetContract) that leaves it out, if any, and the capability
    (TargetCapabilities) it needs, if any: a method can be there and raise NotImplementedError."""

    methods: tuple[str, ...]
    restricted_by: str | None = None
    capability: str | None = None


CALL_PATTERNS: dict[str, CallPattern] = {
    "free_group": CallPattern(("free_group_begin", "free_group_end"), None, "free_groups"),
    "misplaced_free_group_call": CallPattern(
        ("free_group_begin", "free_group_end"), "free_group_calls_paired", "free_groups"
    ),
    "backup_restore": CallPattern(("backup_state", "restore_state"), "no_backup_restore", "backup_restore"),
    "free_full": CallPattern(("free_full",), None, "free_full"),
    "free_of_released_swa_peers_at_ps1": CallPattern(("free",), "free_held_swa_peers_only_at_ps1"),
    "decode_without_capacity": CallPattern(("alloc_decode",), "decode_capacity_prechecked", "decode_beyond_capacity"),
    "swa_tail": CallPattern(("alloc_extend_swa_tail",), None, "alloc_extend_swa_tail"),
    "unaligned_swa_tail": CallPattern(("alloc_extend_swa_tail",), "swa_tail_page_aligned", "alloc_extend_swa_tail"),
}


class AllocatorMachine(RuleBasedStateMachine):
    """Rules shared by every machine: free groups, backup/restore, clear, and the step check.
    A subclass's initialize rule calls `start`, which makes the allocator and the model."""

    factory: Factory = staticmethod(reference_factory)
    contract: TargetContract = SPEC_CONTRACT
    """The calls this target's engine makes (properties/targets); rules leave out what it restricts."""
    capabilities: TargetCapabilities = FULL_CAPABILITIES
    """The calls this target can take at all; rules leave out the others, whatever the contract."""
    device: str = "cpu"
    stats = None  # a properties.runners.check.Stats shared by one check's machines, or None
    finding_mask: FindingMask | None = None
    """Findings the run already reported (properties/machines/masking.py): they fail no step."""
    backups = Bundle("backups")

    def __init__(self) -> None:
        super().__init__()
        self.allocator: SWAAllocator | None = None
        self.window: int | None = None

    def start(self, size: int, size_swa: int, page_size: int, need_sort: bool) -> None:
        """Build the allocator and the model for one program."""
        need_sort = (need_sort and self.capabilities.need_sort) or not self.capabilities.unsorted_frees
        self.model = SWAModel(size, size_swa, page_size, need_sort)
        calls: list[dict] = []
        record = {"config": self.model.config(), "calls": calls}
        self.mask = (self.finding_mask or FindingMask()).program(record)
        if self.stats is not None:
            # Recorded before the factory runs: a target that fails to construct still leaves
            # this program's config, not the previous program's.
            self.stats.programs += 1
            self.stats.last_program = record
        self.allocator = self.factory(AllocatorConfig(size, size_swa, page_size, self.device, need_sort))
        self.driver = AllocatorDriver(self.allocator, self.device, calls, mask=self.mask)
        self.handles: dict[int, Any] = {}
        """Live holdings (SlotMachine) or requests (RequestMachine), by handle."""
        self.next_handle = 0
        self.saved: dict[int, tuple[SWAModel, dict[int, Any]]] = {}
        self.result: torch.Tensor | None = None
        self.expectation = Expectation("__init__")
        self.step_check = StepCheck(self.allocator, self.driver)
        self.failed = False
        self.allocated_in_group: set[int] = set()
        """Full slots allocated since the open free group began."""

    def allows(self, pattern: str) -> bool:
        """Whether a rule may make calls of `pattern` (a CALL_PATTERNS key) on this target."""
        if self.allocator is None:
            return False
        needs = CALL_PATTERNS[pattern]
        if needs.restricted_by is not None and getattr(self.contract, needs.restricted_by):
            return False
        if needs.capability is not None and not getattr(self.capabilities, needs.capability):
            return False
        return all(hasattr(self.allocator, method) for method in needs.methods)

    # ------------------------------------------------------------ the step
    def allocate(self, method: str, args: tuple, expected: list[int] | None, live_before: set[int]) -> list[int] | None:
        """Make one allocation call whose model outcome is `expected` (None: must fail)."""
        if expected is None:
            # A failed allocation must leave the state as it was right before it.
            self.step_check.expect_failed_allocation()
        self.result = self.driver.call(method, *args)
        self.expectation = Expectation(method, expected, True, live_before)
        if expected is None:
            full, swa = self.model.full.available(), self.model.swa.available()
            event(
                "allocation failed: SWA pool ran out first" if swa < full else "allocation failed: full pool exhausted"
            )
            return None
        if self.model.full.available() == 0:
            event(reach.FILLED_FULL_POOL)
        if self.model.swa.available() == 0:
            event(reach.FILLED_SWA_POOL)
        if self.model.in_group:
            self.allocated_in_group.update(expected)
        return expected

    def release(self, method: str, tokens: list[int], owned: list[int] | None = None) -> None:
        """One free, free_swa or free_full call, made on the allocator and the model.

        Args:
            method: "free", "free_swa" or "free_full".
            tokens: the full slots the call names.
            owned: the live slots the call is meant to release, when it names only part of
                their pages (`tokens` is then a subset of `owned`).
        """
        self.driver.call(method, tokens)
        getattr(self.model, method)(tokens)
        self.expectation = Expectation(method)
        if owned is not None and len(tokens) < len(owned):
            event(reach.labelled(reach.PART_OF_A_PAGE, method))
        if method != "free_swa" and self.model.in_group and not self.allocated_in_group.isdisjoint(owned or tokens):
            event(reach.ALLOC_AND_FREE_IN_ONE_GROUP)

    def end_tokens(self, tokens: list[int], released: int, ending: str, offsets: frozenset[int] | None = None) -> None:
        """Release every slot of a request or holding whose first `released` tokens no longer
        hold SWA peers, the way `ending` (one of ENDINGS) says. With `offsets` (page size > 1,
        `released` a page boundary), each call names of each page only the tokens at those
        offsets (all of them where it has none there): freeing any token frees the page."""
        if not self.allows("free_full"):
            ending = "free"
        elif ending == "free" and released and self.model.page_size == 1 and not self.allows(
            "free_of_released_swa_peers_at_ps1"
        ):
            ending = "free_full_then_free"
        if ending == "free":
            calls = [("free", tokens)]
        elif ending == "free_swa_then_full":
            calls = [("free_swa", tokens[released:]), ("free_full", tokens)]
        else:
            calls = [("free_full", tokens[:released]), ("free", tokens[released:])]
        for method, span in calls:
            if offsets is None:
                self.release(method, span)
            else:
                self.release(method, self.part_of_each_page(span, offsets), span)

    def part_of_each_page(self, tokens: list[int], offsets: frozenset[int]) -> list[int]:
        """Of page-aligned `tokens`, those at `offsets` within their page, or a page's every
        token where none of it is at those offsets."""
        ps = self.model.page_size
        pages = [tokens[start : start + ps] for start in range(0, len(tokens), ps)]
        return [token for page in pages for token in ([t for i, t in enumerate(page) if i in offsets] or page)]

    def new_handle(self, holding: object) -> int:
        self.next_handle += 1
        self.handles[self.next_handle] = holding
        return self.next_handle

    def live_tokens(self) -> set[int]:
        raise NotImplementedError

    def live_requests(self) -> list[Request]:
        return []

    @invariant()
    def allocator_matches_model(self) -> None:
        if self.allocator is None or self.mask.halted:
            return
        self.failed = True  # until the step passes: a check that raises ends the program too
        violations = self.step_check.after_step(
            self.model, self.result, self.expectation, self.live_tokens, self.live_requests, self.window
        )
        if self.stats is not None:
            self.stats.steps += 1
            self.stats.calls[self.expectation.call] += 1
        call = self.expectation.call
        violations = self.mask.unmasked(call, violations, self.out_of_step)
        self.result, self.expectation = None, Expectation("(no call)")
        if violations:
            raise self.mask.failed(violations, call)
        self.failed = False

    def out_of_step(self) -> bool:
        """Whether the allocator's state is no longer the model's (after a masked step)."""
        assert self.allocator is not None  # only a step of a started program asks
        return bool(state_differences(observe(self.allocator, None), self.model))

    def teardown(self) -> None:
        """The whole final state against the model, and the model-free probes on it
        (properties/machines/incremental.py); skipped after a step failed or a rule raised
        (calls the last check did not see)."""
        if self.allocator is None or self.failed or self.mask.halted or self.step_check.logged != len(self.driver.log):
            return
        violations = self.step_check.at_end(self.model, self.live_tokens, self.live_requests, self.window)
        violations = self.mask.unmasked("(end)", violations, lambda: False)
        if violations:
            raise self.mask.failed(violations, "(end)")

    # ------------------------------------------------------ shared rules
    @precondition(lambda self: self.allows("free_group") and not self.model.in_group)
    @rule()
    def free_group_begin(self) -> None:
        self.driver.call("free_group_begin")
        self.model.group_begin()
        self.allocated_in_group = set()
        self.expectation = Expectation("free_group_begin")

    @precondition(lambda self: self.allows("free_group") and self.model.in_group)
    @rule()
    def free_group_end(self) -> None:
        if self.model.full.pending or self.model.swa.pending:
            event("free group flushed deferred frees")
        self.driver.call("free_group_end")
        self.model.group_end()
        self.expectation = Expectation("free_group_end")

    @precondition(lambda self: self.allows("misplaced_free_group_call"))
    @rule()
    def misplaced_free_group_call(self) -> None:
        """A nested free_group_begin, or a free_group_end with no group open, must raise and
        change nothing (a drifting group flag drops or re-releases deferred frees)."""
        call, where = ("free_group_begin", "inside") if self.model.in_group else ("free_group_end", "outside")
        if call == "free_group_end" and self.driver.log and self.driver.log[-1]["call"] == "free_group_end":
            event(reach.DOUBLE_GROUP_END)
        if call == "free_group_begin" and (self.model.full.pending or self.model.swa.pending):
            event(reach.NESTED_BEGIN_WITH_PENDING_FREES)
        try:
            self.driver.call(call)
        except InvariantViolation:  # a differential target's two sides disagreed on the call
            raise
        except Exception:  # any other error will do: the SPEC names none
            breach = ""
        else:
            breach = f"{call} {where} a free group did not raise"
        self.expectation = Expectation(call, breach=breach)

    @precondition(lambda self: self.allows("backup_restore") and not self.model.in_group)
    @rule(target=backups)
    def backup_state(self) -> int:
        self.next_handle += 1
        self.driver.call("backup_state", self.next_handle)
        self.saved[self.next_handle] = (self.model.snapshot(), copy.deepcopy(self.handles))
        self.expectation = Expectation("backup_state")
        return self.next_handle

    @precondition(lambda self: self.allows("backup_restore") and not self.model.in_group)
    @rule(backup=backups)
    def restore_state(self, backup: int) -> None:
        if backup not in self.saved:
            return
        model, handles = self.saved[backup]
        self.driver.call("restore_state", backup)
        self.model, self.handles = model.snapshot(), copy.deepcopy(handles)
        self.expectation = Expectation("restore_state")

    @precondition(lambda self: self.allocator is not None)
    @rule(now=st.integers(0, 3))
    def clear(self, now: int) -> None:
        """Drop everything (an engine's cache flush: rare). Three draws in four skip it, so that
        programs build up deep states; drawn at every step it undid most of them."""
        if now:
            return
        if self.model.in_group:
            event(reach.CLEAR_IN_GROUP)
        self.driver.call("clear")
        self.model.clear()
        self.handles.clear()
        self.saved.clear()
        self.expectation = Expectation("clear")
