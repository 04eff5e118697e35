"""Each sglang release's scheduler contract (properties.targets.sglang_releases): a restriction
from the first release whose scheduler keeps it, and none about calls the release cannot take."""

from __future__ import annotations

import pytest

from properties.targets import SGLANG_CONTRACT, TargetCapabilities, TargetError
from properties.targets.sglang_releases import release_key, sglang_contract

# What the adapter reads from three releases (docs/sglang-releases.md).
CAPABILITIES_0_4_10 = TargetCapabilities(
    paged=False, need_sort=False, alloc_extend_swa_tail=False, free_full=False, backup_restore=False,
    available_size=False, mapping_sentinel=False,
)
CAPABILITIES_0_5_13 = TargetCapabilities(free_full=False, available_size=False)
CAPABILITIES_0_5_23 = TargetCapabilities(backup_restore=False)


def test_the_newest_release_keeps_sglangs_contract() -> None:
    assert sglang_contract("0.5.23", CAPABILITIES_0_5_23) == SGLANG_CONTRACT


def test_backup_and_restore_are_driven_while_a_speculative_worker_calls_them() -> None:
    assert not sglang_contract("0.5.13", CAPABILITIES_0_5_13).no_backup_restore
    assert sglang_contract("0.5.14", CAPABILITIES_0_5_13).no_backup_restore
    # 0.5.23 cannot be called with them at all: a capability, not a restriction.
    assert not sglang_contract("0.5.23", CAPABILITIES_0_5_23).no_backup_restore


def test_frees_of_released_peers_are_driven_until_the_scheduler_splits_them() -> None:
    assert not sglang_contract("0.5.18", CAPABILITIES_0_5_13).free_held_swa_peers_only_at_ps1
    assert sglang_contract("0.5.19", CAPABILITIES_0_5_13).free_held_swa_peers_only_at_ps1


def test_a_release_without_the_calls_has_no_restriction_about_them() -> None:
    contract = sglang_contract("0.4.10.post2", CAPABILITIES_0_4_10)
    assert contract.restrictions() == ["free_group_calls_paired"]
    assert sglang_contract("0.5.13", CAPABILITIES_0_5_13).restrictions() == [
        "decode_capacity_prechecked", "swa_tail_page_aligned", "free_group_calls_paired",
    ]


def test_release_numbers_are_read_with_their_suffixes_and_nonsense_is_refused() -> None:
    assert release_key("0.4.10.post2") == (0, 4, 10)
    assert release_key("0.5.0rc0") == (0, 5, 0)
    with pytest.raises(TargetError, match="not an sglang release number"):
        release_key("latest")


def test_without_a_gpu_triton_is_interpreted_unless_it_was_imported_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import torch

    from allocator import sglang_adapter

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(sys.modules, "triton", object())
    sglang_adapter._interpret_triton_without_a_gpu()
    assert "TRITON_INTERPRET" not in sglang_adapter.os.environ  # too late: triton compiled its helpers
    monkeypatch.delitem(sys.modules, "triton")
    sglang_adapter._interpret_triton_without_a_gpu()
    assert sglang_adapter.os.environ["TRITON_INTERPRET"] == "1"
