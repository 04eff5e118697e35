"""Which of SGLANG_CONTRACT's restrictions each sglang release's scheduler keeps.

What a release's allocator can be called with is read from the allocator itself
(allocator.sglang_adapter.sglang_capabilities). What its scheduler never does cannot be: it is
read from each release's scheduler source once and written down here (docs/sglang-releases.md
has the evidence). A restriction is kept from the first release whose scheduler keeps it.
"""

from __future__ import annotations

import dataclasses
import re

from properties.targets import SGLANG_CONTRACT, TargetCapabilities, TargetContract, TargetError

KEPT_FROM: dict[str, tuple[int, ...]] = {
    # Every release's scheduler checks decode capacity first (ScheduleBatch.check_decode_mem,
    # later check_decode_capacity) and retracts requests until the batch fits.
    "decode_capacity_prechecked": (0, 4, 9),
    # From 0.5.19 a finished request is freed by free_kv_row_segments (free_full of the part
    # the window released, free of the rest). Before, the radix cache frees all of its tokens
    # with free() after the window's free_swa calls: those releases do call free on released
    # peers (their page-size-1 free_swa skips entries that are 0).
    "free_held_swa_peers_only_at_ps1": (0, 5, 19),
    # The only caller of alloc_extend_swa_tail (0.5.12 on), the disaggregated decode
    # admission, asks for the tail from the page-floored window start.
    "swa_tail_page_aligned": (0, 5, 12),
    # Every release pairs free_group_begin / free_group_end in the scheduler's free paths.
    "free_group_calls_paired": (0, 4, 9),
}


def release_key(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a release number such as '0.5.23', '0.4.10.post2' or '0.5.0rc0'."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        raise TargetError(f"{version!r} is not an sglang release number")
    return tuple(int(part) for part in match.groups())


def sglang_contract(version: str, capabilities: TargetCapabilities) -> TargetContract:
    """The restrictions of SGLANG_CONTRACT that release `version`'s scheduler keeps, less those
    about calls the release cannot take at all (its capabilities already leave them out)."""
    key = release_key(version)
    moot = {
        "decode_capacity_prechecked": not capabilities.paged,
        "swa_tail_page_aligned": not capabilities.alloc_extend_swa_tail,
        "free_group_calls_paired": not capabilities.free_groups,
    }
    flags = {
        name: getattr(SGLANG_CONTRACT, name) and key >= KEPT_FROM[name] and not moot.get(name, False)
        for name in KEPT_FROM
    }
    return dataclasses.replace(SGLANG_CONTRACT, **flags)
