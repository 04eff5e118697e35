"""Differential targets: every call goes to two allocators, which must then agree.

`differential_target(first, second)` is a Target like any other, so the machines and the
check runner need nothing special for it. Its factory builds both allocators and wraps them
in a `DifferentialAllocator`. After each call the two must agree on what the call returned
(indices or None, or whether it raised), the full, SWA and hybrid available sizes, the whole
mapping, and the free units of each pool. Free units are compared as multisets: their order
decides later allocations, so an order difference shows up in a later returned value. The
first disagreement raises `InvariantViolation` (DIFFERENTIAL), which the machines shrink and
report like any violation.

The machines' own checks and the probes read the first allocator. The contract is the stricter
of the two targets' contracts, so every program is legal for both.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from allocator.interface import SWAAllocator
from canary.invariants import INVARIANTS, InvariantViolation, Name, Violation
from canary.probes import MappingLayout
from properties.compare import differences, read_state
from properties.targets import FULL_CAPABILITIES, AllocatorConfig, Target, TargetCapabilities

# What the machines and probes read from an allocator without calling it; read from the first.
INTROSPECTION = (
    "full_attn_allocator",
    "swa_attn_allocator",
    "full_to_swa_index_mapping",
    "page_size",
    "size",
    "size_full",
    "size_swa",
    "device",
    "in_free_group",
)


def differential_target(first: Target, second: Target) -> Target:
    """`first`, checked call by call against `second`, under both contracts."""

    capabilities = first.capabilities.both(second.capabilities)

    def factory(config: AllocatorConfig) -> DifferentialAllocator:
        sides = first.factory(config), second.factory(config)
        return DifferentialAllocator(*sides, (first.name, second.name), capabilities)

    factory.__name__ = f"{first.name}-vs-{second.name}"
    return Target(f"{first.name} vs {second.name}", factory, first.contract.stricter(second.contract), capabilities)


class DifferentialAllocator:
    """Two allocators behind one SPEC §1 interface."""

    def __init__(
        self,
        first: SWAAllocator,
        second: SWAAllocator,
        names: tuple[str, str],
        capabilities: TargetCapabilities = FULL_CAPABILITIES,
    ) -> None:
        self.sides = (first, second)
        self.names = names
        self.has_available_size = capabilities.available_size
        """False when either side's available_size() is not implemented (an older sglang
        release): then neither is asked, nor compared (the view stands in min(full, swa))."""
        self.mapping_layout = MappingLayout.SENTINEL if capabilities.mapping_sentinel else MappingLayout.PADDED
        """Padded when either side's mapping has no sentinel: the view then reads the first
        side's token entries only, and nothing translates -1 (those releases never do)."""
        self._compare_states("construction")
        if all(hasattr(side, "backup_state") and hasattr(side, "restore_state") for side in self.sides):
            self.backup_state, self.restore_state = self._backup_state, self._restore_state

    def __getattr__(self, name: str) -> Any:
        if name in INTROSPECTION:
            return getattr(self.sides[0], name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ------------------------------------------------------------- calls
    def alloc(self, need_size: int) -> torch.Tensor | None:
        return self._call("alloc", need_size)

    def alloc_extend(self, *args: Any) -> torch.Tensor | None:
        return self._call("alloc_extend", *args)

    def alloc_decode(self, *args: Any) -> torch.Tensor | None:
        return self._call("alloc_decode", *args)

    def alloc_extend_swa_tail(self, *args: Any) -> torch.Tensor | None:
        return self._call("alloc_extend_swa_tail", *args)

    def free(self, free_index: torch.Tensor) -> None:
        self._call("free", free_index)

    def free_swa(self, free_index: torch.Tensor) -> None:
        self._call("free_swa", free_index)

    def free_full(self, free_index: torch.Tensor) -> None:
        self._call("free_full", free_index)

    def free_group_begin(self) -> None:
        self._call("free_group_begin")

    def free_group_end(self) -> None:
        self._call("free_group_end")

    def clear(self) -> None:
        self._call("clear")

    def _backup_state(self) -> tuple[Any, Any]:
        return tuple(side.backup_state() for side in self.sides)

    def _restore_state(self, states: tuple[Any, Any]) -> None:
        for side, state in zip(self.sides, states):
            side.restore_state(state)
        self._compare_states("restore_state")

    # ----------------------------------------------------------- queries
    def available_size(self) -> int:
        if not self.has_available_size:
            raise NotImplementedError(f"available_size() is not implemented by both of {' and '.join(self.names)}")
        return self._call("available_size", changes_state=False)

    def full_available_size(self) -> int:
        return self._call("full_available_size", changes_state=False)

    def swa_available_size(self) -> int:
        return self._call("swa_available_size", changes_state=False)

    def translate_loc_from_full_to_swa(self, kv_indices: torch.Tensor) -> torch.Tensor:
        return self._call("translate_loc_from_full_to_swa", kv_indices, changes_state=False)

    # -------------------------------------------------------- comparing
    def _call(self, method: str, *args: Any, changes_state: bool = True) -> Any:
        """Make the call on both (each with its own copy of the tensor arguments), then compare
        the outcomes and, unless it is a query, the states."""
        what = f"{method}({', '.join(_show(arg) for arg in args)})"
        outcomes = [_outcome(side, method, _copied(args)) for side in self.sides]
        differences = _outcome_differences(outcomes, self.names)
        if differences:
            self._raise(f"in {what}", differences)
        value, error = outcomes[0]
        if error is not None:
            raise error  # both raised: not a difference, the first's error stands for the call
        if changes_state:
            self._compare_states(what)
        return value

    def _compare_states(self, what: str) -> None:
        first, second = (read_state(side, None) for side in self.sides)
        if not self.has_available_size:  # neither is asked (see __init__): -1 on both sides
            first, second = (replace(state, sizes=(state.sizes[0], state.sizes[1], -1)) for state in (first, second))
        # Free units as multisets: their order decides later allocations, so an order
        # difference shows up in a later returned value.
        assert second.full_free is not None and second.swa_free is not None
        expected = replace(second, full_free=second.full_free.unordered(), swa_free=second.swa_free.unordered(),
                           in_free_group=None)
        found = differences(first, expected, self.names)
        if found:
            self._raise(f"after {what}", found)

    def _raise(self, what: str, differences: list[str]) -> None:
        detail = f"difference{'s' if len(differences) > 1 else ''} {what}: {'; '.join(differences)}"
        severity = INVARIANTS[Name.DIFFERENTIAL].severity
        raise InvariantViolation([Violation(Name.DIFFERENTIAL, severity, len(differences), [], detail)])


def _outcome(side: Any, method: str, args: tuple) -> tuple[Any, BaseException | None]:
    try:
        return getattr(side, method)(*args), None
    except Exception as error:  # an error is an outcome to compare, whichever it is
        return None, error


def _outcome_differences(outcomes: list[tuple[Any, BaseException | None]], names: tuple[str, str]) -> list[str]:
    (first, first_error), (second, second_error) = outcomes
    if (first_error is None) != (second_error is None):
        return [f"{name} {_describe(value, error)}" for name, (value, error) in zip(names, outcomes)]
    if first_error is not None:
        return []
    if _plain(first) != _plain(second):
        return [f"returned {_show(first)} ({names[0]}) and {_show(second)} ({names[1]})"]
    return []


def _plain(value: Any) -> Any:
    """A value as comparable plain data (tensors as lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _describe(value: Any, error: BaseException | None) -> str:
    if error is not None:
        return f"raised {type(error).__name__}: {error}"
    return f"returned {_show(value)}"


def _show(value: Any) -> str:
    return repr(_plain(value))


def _copied(args: tuple) -> tuple:
    return tuple(arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args)
