"""The names the command line lists in its help: restrictions, machines, mutants, injections.

The registries that define them (`properties.targets.RESTRICTIONS`, `properties.machines.MACHINES`,
`properties.targets.mutants.MUTANTS`, `canary.simulate.INJECTIONS`) import torch, about 3 s;
these copies import nothing, so that every `--help` prints at once. A value given on the
command line is still checked against the registry itself. tests/test_cli_names.py holds each
copy equal to its registry.
"""

from __future__ import annotations

RESTRICTIONS = (
    "decode_capacity_prechecked",
    "free_group_calls_paired",
    "free_held_swa_peers_only_at_ps1",
    "no_backup_restore",
    "swa_tail_page_aligned",
)
MACHINES = (
    "RequestMachinePS1",
    "RequestMachinePS16",
    "RequestMachinePS2",
    "RequestMachinePS4",
    "RequestMachinePS64",
    "SlotMachine",
)
MUTANTS = (
    "available_uses_max",
    "clear_drops_sentinel",
    "clear_leaves_group_open",
    "decode_wrong_page_at_boundary",
    "extend_ignores_last_page_contiguity",
    "free_keeps_mapping",
    "free_swa_releases_pad",
    "free_swa_token_granular",
    "group_end_flushes_twice",
    "group_resolves_at_end",
    "merge_forgets_staged",
    "nested_begin_drops_pending",
    "non_atomic_pair",
    "precheck_ignores_staged",
    "restore_skips_mapping",
    "swa_last_loc_untranslated",
    "tail_maps_non_tail_slots",
    "tail_maps_padded_end",
    "tail_start_rounded_up",
    "token_free_goes_to_front",
    "translate_off_by_one",
)
INJECTIONS = ("CONSERVE", "NODUP", "PAD", "SENTINEL", "STALE", "SWA_LE_FULL", "WINDOW")
