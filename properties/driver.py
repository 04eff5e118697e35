"""Calls an allocator with plain-int arguments and keeps the log of every call.

Arguments are the golden-trace form (index lists, ints), so the log replays anywhere: it is
what a finding exports as a standalone regression test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from allocator.golden import call_arguments


@dataclass
class AllocatorDriver:
    allocator: Any
    device: str
    log: list[dict] = field(default_factory=list)

    def call(self, method: str, *args: Any) -> torch.Tensor | None:
        """Call `method` with list arguments turned into int64 tensors; log it first, so a
        call that raises is in the log too."""
        entry = {"call": method, "args": list(args)}
        self.log.append(entry)
        return getattr(self.allocator, method)(*call_arguments(entry, self.device))
