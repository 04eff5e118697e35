"""Findings already reported, masked so that a check can go on looking for the others.

A finding's identity (`FindingKey`) is (invariant, the allocator call of the step that broke
it, the shape of the check's detail): the detail's clauses with index lists and numbers
blanked, deduplicated and sorted. Two violations with the same key are the same finding,
whatever the indices, the sizes or the program that reached them. A crash (a call that
raised) is keyed ("CRASH", the call, the shape of "ErrorType: message").

Masking a key makes its violations stop failing a step; any other violation of the same step
still fails it. After a step that only masked violations broke, the program goes on if the
allocator still agrees with the reference model (mapping, free lists, sizes, free-group
state). If it does not, the model can no longer say what the allocator should do, so the rest
of the program is not driven: no more calls, no more checks (going on would report what the
model got wrong, not the allocator). A masked crash also ends its program's calls, since the
program cannot go past a call that raised. Either way the masked keys the program went past
travel with any later failure as the findings it `follows`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from canary.invariants import InvariantViolation, Name, Violation

FindingKey = tuple[Name, str, str]
"""(invariant, allocator call, shape of the detail)."""

_INDEX_LIST = re.compile(r"\[[^\[\]]*\]")
_NUMBER = re.compile(r"-?\d+")
_CLAUSE_SEPARATORS = re.compile(r"; |, then ")

ErrorType = TypeVar("ErrorType", bound=BaseException)


def detail_shape(detail: str) -> str:
    """A detail with what varies between programs blanked: index lists become [...], numbers
    N, and its clauses (split at "; " and ", then ") are deduplicated and sorted, since the
    same differences may be listed in another order."""
    blanked, nested = detail, None
    while nested != blanked:  # innermost lists first, until none is left
        nested, blanked = blanked, _INDEX_LIST.sub("\0", blanked)
    blanked = _NUMBER.sub("N", blanked).replace("\0", "[...]")
    clauses = {clause.strip() for clause in _CLAUSE_SEPARATORS.split(blanked) if clause.strip()}
    return "; ".join(sorted(clauses))


def violation_key(call: str, violation: Violation) -> FindingKey:
    return (violation.invariant, call, detail_shape(violation.detail))


def error_key(call: str, error: BaseException) -> FindingKey:
    """The key of a failure a call raised: an invariant violation raised inside the call (a
    differential target) is keyed by its violations, anything else is a crash."""
    if isinstance(error, InvariantViolation):
        return violation_key(call, error.violations[0])
    return (Name.CRASH, call, detail_shape(f"{type(error).__name__}: {error}"))


def error_keys(call: str, error: BaseException) -> list[FindingKey]:
    """Every key a failure carries (an invariant violation lists several)."""
    if isinstance(error, InvariantViolation):
        return list(dict.fromkeys(violation_key(call, violation) for violation in error.violations))
    return [error_key(call, error)]


@dataclass
class FindingMask:
    """The keys one check run has reported, shared by every program the run makes, and when
    the run first saw a failure it does not mask (its time to detect, before shrinking)."""

    keys: frozenset[FindingKey] = frozenset()
    first_failure_at: float | None = None

    def program(self, record: dict | None = None) -> "ProgramMask":
        """The mask of one program whose config and call log are `record`."""
        return ProgramMask(self, record)


@dataclass
class ProgramMask:
    """One program's side of the mask: the masked findings it went past, and whether its
    allocator is still driven."""

    mask: FindingMask
    record: dict | None = None
    """The program's {"config", "calls"}: a failure carries it, since Hypothesis may report
    several failures of one run and replays only one of them last."""
    passed: list[FindingKey] = field(default_factory=list)
    halted: bool = False

    def unmasked(self, call: str, violations: list[Violation], out_of_step: Callable[[], bool]) -> list[Violation]:
        """The violations of a step that still fail it. When masked ones alone broke the step,
        record them, and halt the program if `out_of_step()` says the allocator no longer
        agrees with the model."""
        if not self.mask.keys or not violations:
            return violations
        kept = [violation for violation in violations if violation_key(call, violation) not in self.mask.keys]
        if not kept:
            keys = dict.fromkeys(violation_key(call, violation) for violation in violations)
            self.passed += [key for key in keys if key not in self.passed]
            self.halted = out_of_step()
        return kept

    def swallows(self, call: str, error: BaseException) -> bool:
        """True (and the program halts) if a call's failure is masked in every key it carries."""
        keys = error_keys(call, error)
        if self.mask.keys and all(key in self.mask.keys for key in keys):
            self.passed += [key for key in keys if key not in self.passed]
            self.halted = True
            return True
        return False

    def failed(self, violations: list[Violation], call: str) -> InvariantViolation:
        """The error a step that broke `violations` raises; the run's first one sets its time
        to detect (a call that raises may be expected, so only failed steps count)."""
        if self.mask.first_failure_at is None:
            self.mask.first_failure_at = time.monotonic()
        return self.tagged(InvariantViolation(violations), call)

    def tagged(self, error: ErrorType, call: str) -> ErrorType:
        """`error`, marked with the call of the step that failed and the masked findings the
        program went past."""
        error.allocator_call = call  # type: ignore[attr-defined]
        error.follows = list(self.passed)  # type: ignore[attr-defined]
        error.program_calls = self.record  # type: ignore[attr-defined]
        return error
