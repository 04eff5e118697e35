"""Calls an allocator with plain-int arguments and keeps the log of every call.

Arguments are the golden-trace form (index lists, ints), so the log replays anywhere: it is
what a finding exports as a standalone regression test. `backup_state` and `restore_state`
are logged with an integer handle in place of the state object; the driver keeps the states.
With a `ProgramMask` (properties/machines/masking.py), a call that raises a masked failure
halts the program instead, and a halted driver makes no more calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from allocator.interface import SWAAllocator, call_arguments
from properties.machines.masking import ProgramMask


@dataclass
class AllocatorDriver:
    allocator: SWAAllocator
    device: str
    log: list[dict] = field(default_factory=list)
    saved_states: dict[int, Any] = field(default_factory=dict)
    mask: ProgramMask | None = None

    def call(self, method: str, *args: Any) -> torch.Tensor | None:
        """Call `method` with list arguments turned into int64 tensors; log it first, so a
        call that raises is in the log too. A halted program's calls are not made (None)."""
        if self.mask is not None and self.mask.halted:
            return None
        entry = {"call": method, "args": list(args)}
        self.log.append(entry)
        try:
            return self._make(entry)
        except Exception as error:  # the target's failure: masked, or marked with its call
            if self.mask is None:
                raise
            if self.mask.swallows(method, error):
                return None
            self.mask.tagged(error, method)
            raise

    def _make(self, entry: dict) -> torch.Tensor | None:
        method, args = entry["call"], entry["args"]
        if method == "backup_state":
            self.saved_states[args[0]] = self.allocator.backup_state()
            return None
        if method == "restore_state":
            self.allocator.restore_state(self.saved_states[args[0]])
            return None
        result: torch.Tensor | None = getattr(self.allocator, method)(*call_arguments(entry, self.device))
        return result

    def replay(self, calls: list[dict]) -> None:
        """Make every logged call again, in order."""
        for entry in calls:
            self.call(entry["call"], *entry["args"])
