"""Which SPEC §1 call patterns each sglang release's scheduler never makes.

What a release's allocator can be called with is read from the allocator itself
(allocator.sglang_adapter.sglang_capabilities). What its scheduler never does cannot be: it is
read from each release's scheduler source once and written down here (docs/sglang-releases.md
has the evidence, call site by call site). A restriction is kept from the first release whose
scheduler keeps it; it is moot (left unset) where the release cannot take the calls at all.
"""

from __future__ import annotations

import re

from properties.targets import TargetCapabilities, TargetContract, TargetError

KEPT_FROM: dict[str, tuple[int, ...]] = {
    # EAGLE's draft step (speculative/eagle_worker.py, to 0.5.12) and DFlash (0.5.11-0.5.13)
    # back the allocator up, allocate the draft tokens and restore it. From 0.5.14 nothing
    # outside the allocators calls backup_state / restore_state.
    "no_backup_restore": (0, 5, 14),
    # From 0.5.19 a finished request is freed by free_kv_row_segments (free_full of the part
    # the window released, free of the rest). Before, the chunk and radix caches free all of
    # its tokens with free() after the window's free_swa calls: those releases do call free on
    # released peers (their page-size-1 free_swa skips entries that are 0, up to 0.5.19).
    "free_held_swa_peers_only_at_ps1": (0, 5, 19),
    # Every paged release's scheduler checks decode capacity first (ScheduleBatch.check_decode_mem:
    # full_available_size() and swa_available_size() against the new pages x page_size) and
    # retracts requests until the batch fits.
    "decode_capacity_prechecked": (0, 4, 9),
    # The only caller of alloc_extend_swa_tail (0.5.12 on), the disaggregated decode
    # admission, asks for the tail from the page-floored window start, at or after the prefix.
    "swa_tail_page_aligned": (0, 5, 12),
    # Every release pairs free_group_begin / free_group_end in straight-line code of the
    # scheduler's result processing (and, from 0.5.18, of maybe_evict_swa), never nested.
    "free_group_calls_paired": (0, 4, 9),
}


def release_key(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a release number such as '0.5.23', '0.4.10.post2' or '0.5.0rc0'.

    Args:
        version: the release number.

    Returns:
        The three leading numbers.
    """
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        raise TargetError(f"{version!r} is not an sglang release number")
    return tuple(int(part) for part in match.groups())


def sglang_contract(version: str, capabilities: TargetCapabilities) -> TargetContract:
    """The restrictions that release `version`'s scheduler keeps, less those about calls the
    release cannot take at all (its capabilities already leave them out).

    Args:
        version: the installed release number.
        capabilities: what that release's allocator can be called with.

    Returns:
        The release's contract.
    """
    key = release_key(version)
    moot = {
        "no_backup_restore": not capabilities.backup_restore,
        "decode_capacity_prechecked": not capabilities.paged,
        "swa_tail_page_aligned": not capabilities.alloc_extend_swa_tail,
        "free_group_calls_paired": not capabilities.free_groups,
    }
    return TargetContract(
        **{name: key >= kept_from and not moot.get(name, False) for name, kept_from in KEPT_FROM.items()}
    )
