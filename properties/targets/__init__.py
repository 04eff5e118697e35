"""Which allocator the machines drive, and the calls that allocator accepts.

A target is a factory plus a `TargetContract`. The factory takes an `AllocatorConfig` and
returns an object with the SPEC §1 interface. The contract names the SPEC §1 call patterns the
target does not promise to handle and that its serving engine never makes; the machines leave
exactly those out, so every violation they report is one an engine can reach. The reference
allocator takes the whole SPEC (no restriction).

Built in: 'reference', 'sglang', 'mutant:NAME' (properties/targets/mutants/). Any other
`package.module:factory` is a target too; its contract is the factory's `contract` attribute
if it has one, else the whole SPEC. Any of them followed by '@PYTHON' runs in a worker process
under that interpreter (properties/targets/isolated.py); '@' alone: under this one.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import torch

from allocator import SWATokenToKVPoolAllocator
from allocator.interface import SWAAllocator


class TargetError(ValueError):
    """A --target / SWA_TARGET spec that does not name a usable allocator factory."""


@dataclass(frozen=True)
class AllocatorConfig:
    size: int
    size_swa: int
    page_size: int
    device: str = "cpu"
    need_sort: bool = False
    dtype: torch.dtype = torch.float16


Factory = Callable[[AllocatorConfig], SWAAllocator]
"""What a target is made from: a config in, an allocator with the SPEC §1 interface out."""


@dataclass(frozen=True)
class TargetContract:
    """Call patterns of SPEC §1 that the machines leave out for a target. Every flag is a
    restriction (set: the pattern is never called), so two contracts combine by setting each
    flag either one sets (`stricter`)."""

    no_backup_restore: bool = False
    """backup_state / restore_state are never called."""
    free_held_swa_peers_only_at_ps1: bool = False
    """At page size 1, free and free_swa name only tokens whose SWA peer is still held. A
    request whose window already released some SWA peers ends with free_swa(live tokens) then
    free_full(all tokens), or free_full(released part) then free(live part), never free(all)."""
    decode_capacity_prechecked: bool = False
    """alloc_decode is called only when available_size() covers one page for each request that
    starts a new page: a decode that would fail is never made (the engine retracts requests
    until the batch fits, then decodes)."""
    swa_tail_page_aligned: bool = False
    """alloc_extend_swa_tail is called only with the SWA tail starting on a page boundary at or
    after the prefix end ((seq - swa_tail_len) % page_size == 0 and >= prefix), and a tail of
    at least one token: the page-floored window start of a disaggregated decode admission."""
    free_group_calls_paired: bool = False
    """free_group_begin is never nested and free_group_end never comes without a begin, so the
    error SPEC asks for on those calls is not checked."""

    def stricter(self, other: "TargetContract") -> "TargetContract":
        """The contract that restricts everything either of the two restricts."""
        return TargetContract(
            **{flag.name: getattr(self, flag.name) or getattr(other, flag.name) for flag in dataclasses.fields(self)}
        )

    def restrictions(self) -> list[str]:
        """The names of the flags that are set."""
        return [flag.name for flag in dataclasses.fields(self) if getattr(self, flag.name)]


RESTRICTIONS = tuple(flag.name for flag in dataclasses.fields(TargetContract))


@dataclass(frozen=True)
class TargetCapabilities:
    """What a target can be called with at all. Unlike a contract's restrictions (calls the
    target could take but its engine never makes), a missing capability is a call the target
    cannot take (a method it lacks, a constructor parameter it has not): the machines never
    make it, and `--relax` cannot add it. Every flag is True for the whole SPEC."""

    paged: bool = True
    """Page sizes above 1 (alloc_extend, alloc_decode); else page size 1 only."""
    need_sort: bool = True
    """The need_sort constructor option; else one behaviour only (see unsorted_frees)."""
    unsorted_frees: bool = True
    """Frees can go straight back to the free list (need_sort=False); else every free is staged
    and merged sorted, as need_sort=True does (sglang 0.4.9.post6 - 0.5.0rc0)."""
    alloc_extend_swa_tail: bool = True
    free_full: bool = True
    free_groups: bool = True
    backup_restore: bool = True
    decode_beyond_capacity: bool = True
    """alloc_decode with fewer free pages than it needs (it must return None); else only decodes
    that fit: sglang 0.5.8-0.5.21 under Triton's interpreter (no GPU), whose decode kernel
    reads past the end of an exhausted free list and kills the process."""
    available_size: bool = True
    """available_size() answers; else it raises NotImplementedError and AVAIL does not apply."""
    mapping_sentinel: bool = True
    """The mapping has SPEC's layout (size + page_size + 1 entries, -1 last); else sglang
    <= 0.5.7's (size + size_swa + 1 entries, no sentinel) and SENTINEL does not apply."""

    def both(self, other: "TargetCapabilities") -> "TargetCapabilities":
        """What both targets can be called with."""
        return TargetCapabilities(
            **{flag.name: getattr(self, flag.name) and getattr(other, flag.name) for flag in dataclasses.fields(self)}
        )

    def missing(self) -> list[str]:
        """The names of the capabilities the target lacks."""
        return [flag.name for flag in dataclasses.fields(self) if not getattr(self, flag.name)]

    def inapplicable_invariants(self) -> list[str]:
        """The SPEC §2 invariants that the target's interface leaves nothing to check of."""
        return (["SENTINEL"] if not self.mapping_sentinel else []) + (["AVAIL"] if not self.available_size else [])


FULL_CAPABILITIES = TargetCapabilities()

SPEC_CONTRACT = TargetContract()

SGLANG_CONTRACT = TargetContract(
    # (sglang 0.5.23 has no backup_state / restore_state either: a capability it lacks,
    # sglang_capabilities, not a restriction.)
    # Its page-size-1 free_swa does not skip tokens whose peer is gone (it releases SWA slot 0);
    # its scheduler frees a finished request as free_full of the window-released part and
    # free of the rest (free_kv_row_segments), so free never meets a released peer.
    free_held_swa_peers_only_at_ps1=True,
    # Its alloc_decode checks neither pool before taking pages; the scheduler's
    # check_decode_capacity (available_size() >= pages needed x page_size) runs before
    # every decode and retracts requests until it passes.
    decode_capacity_prechecked=True,
    # Its only caller (disaggregated decode admission) asks for the tail from the
    # page-floored window start, at or after the page-aligned cached prefix.
    swa_tail_page_aligned=True,
    # Its free_group_end without a begin is a silent no-op; the engine pairs every group.
    free_group_calls_paired=True,
)


@dataclass(frozen=True)
class Target:
    name: str
    factory: Factory
    contract: TargetContract = SPEC_CONTRACT
    capabilities: TargetCapabilities = FULL_CAPABILITIES


def with_contract_changes(target: Target, relax: Iterable[str] = (), restrict: Iterable[str] = ()) -> Target:
    """`target` with the restrictions named in `relax` dropped ('all': every one), to look for
    what they hide, and those named in `restrict` added, to mask a known finding and look past
    it. The name says what changed."""
    relaxed = set(RESTRICTIONS) if "all" in relax else set(relax)
    unknown = sorted((relaxed | set(restrict)) - set(RESTRICTIONS))
    if unknown:
        raise TargetError(f"unknown contract restriction(s) {unknown}; known: {', '.join(RESTRICTIONS)}")
    before = target.contract
    after = TargetContract(
        **{name: (getattr(before, name) and name not in relaxed) or name in restrict for name in RESTRICTIONS}
    )
    if after == before:
        return target
    changes = [
        ("+" if getattr(after, name) else "-") + name
        for name in RESTRICTIONS
        if getattr(after, name) != getattr(before, name)
    ]
    # Capabilities stay: a relaxed contract never asks for a call the target cannot take.
    return Target(f"{target.name} [{' '.join(changes)}]", target.factory, after, target.capabilities)


_Reference = TypeVar("_Reference", bound=SWATokenToKVPoolAllocator)


def build_allocator(allocator_class: type[_Reference], config: AllocatorConfig, checked: bool) -> _Reference:
    """The reference allocator, or a subclass of it, built from a config."""
    return allocator_class(
        config.size,
        config.size_swa,
        config.page_size,
        config.dtype,
        config.device,
        need_sort=config.need_sort,
        checked=checked,
    )


def reference_factory(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
    """The built-in reference allocator, in checked mode."""
    return build_allocator(SWATokenToKVPoolAllocator, config, checked=True)


def sglang_factory(config: AllocatorConfig) -> SWAAllocator:
    """sglang's own allocator (needs the `sglang` extra, see .ci/install-sglang)."""
    from allocator.sglang_adapter import make_sglang_allocator

    return make_sglang_allocator(
        config.size, config.size_swa, config.page_size, config.device, config.need_sort, config.dtype
    )


BUILTIN_TARGETS: dict[str, Target] = {
    "reference": Target("reference", reference_factory, SPEC_CONTRACT),
}


def sglang_target() -> Target:
    """The installed sglang release's allocator, with what it can be called with read from it
    and its scheduler's contract (properties.targets.sglang_releases). TargetError when no release is
    importable or the adapter cannot build it."""
    from allocator.sglang_adapter import (
        SglangUnavailableError,
        SglangUnsupportedError,
        installed_sglang_version,
        sglang_capabilities,
    )
    from properties.targets.sglang_releases import sglang_contract

    try:
        capabilities = sglang_capabilities()
        version = installed_sglang_version()
    except (SglangUnavailableError, SglangUnsupportedError) as error:
        raise TargetError(str(error)) from error
    return Target("sglang", sglang_factory, sglang_contract(version, capabilities), capabilities)


SPEC_METHODS = (
    "alloc", "alloc_extend", "alloc_decode", "alloc_extend_swa_tail", "free", "free_swa", "free_full",
    "free_group_begin", "free_group_end", "clear", "available_size", "full_available_size",
    "swa_available_size", "translate_loc_from_full_to_swa",
)
"""The SPEC §1 calls the machines make on a target that has every capability."""
STATE_METHODS = ("backup_state", "restore_state")
"""Called unless the contract restricts `no_backup_restore`."""
CAPABILITY_METHODS = {
    "alloc_extend_swa_tail": ("alloc_extend_swa_tail",),
    "free_full": ("free_full",),
    "free_groups": ("free_group_begin", "free_group_end"),
    "backup_restore": STATE_METHODS,
}
"""The methods the machines call only on a target with that capability (TargetCapabilities)."""
SPEC_ATTRIBUTES = ("full_to_swa_index_mapping", "page_size", "full_attn_allocator", "swa_attn_allocator")
"""What the checks and probes read."""
PROBE_CONFIG = AllocatorConfig(size=8, size_swa=8, page_size=1)


def missing_interface(
    allocator: object, contract: TargetContract, capabilities: TargetCapabilities = FULL_CAPABILITIES
) -> list[str]:
    """The SPEC §1 methods and attributes `allocator` lacks (a method must be callable), of
    those the machines call on this target.

    Args:
        allocator: what a target's factory built.
        contract: the target's contract (backup / restore are needed only when it calls them).
        capabilities: what the target can be called with (a method it cannot take is not needed).
    Returns:
        The missing names, in SPEC order; empty if it offers the whole interface.
    """
    methods = SPEC_METHODS if contract.no_backup_restore else (*SPEC_METHODS, *STATE_METHODS)
    lacking = [names for capability, names in CAPABILITY_METHODS.items() if not getattr(capabilities, capability)]
    not_called = {method for names in lacking for method in names}
    missing = [name for name in methods if name not in not_called and not callable(getattr(allocator, name, None))]
    return missing + [name for name in SPEC_ATTRIBUTES if not hasattr(allocator, name)]


def check_target_builds(target: Target, device: str) -> None:
    """Build one small allocator from the target's factory, before any run: TargetError if
    the factory raises or builds something without the SPEC §1 interface. A target that
    cannot be built is a usage error, not a finding.

    Args:
        target: the target to try.
        device: the device the run will use.
    """
    # A target that always sorts its frees is built as need_sort=True (TargetCapabilities).
    config = dataclasses.replace(PROBE_CONFIG, device=device, need_sort=not target.capabilities.unsorted_frees)
    try:
        allocator = target.factory(config)
    except Exception as error:  # whatever the factory raises, the target is unusable
        raise TargetError(
            f"target {target.name!r} cannot build an allocator: {type(error).__name__}: {error}"
        ) from None
    missing = missing_interface(allocator, target.contract, target.capabilities)
    if missing:
        raise TargetError(
            f"target {target.name!r} built a {type(allocator).__name__}, not an SWA allocator: "
            f"it has no {', '.join(missing)}"
        )


def isolated_spec(spec: str) -> str:
    """`spec` run in a worker process: as it is when it names its Python ('@'), else under this
    interpreter (SPEC@)."""
    return spec if "@" in spec else f"{spec}@"


def resolve_target(spec: str) -> Target:
    """'reference', 'sglang', 'mutant:NAME' or 'package.module:factory', optionally followed
    by '@PYTHON' (an interpreter or a virtual environment's directory; empty: this one) to run
    it in a worker process there."""
    inner, at, python = spec.partition("@")
    if at:
        from properties.targets.isolated import isolated_target

        return isolated_target(inner, python, spec)
    if spec == "sglang":
        return sglang_target()
    if spec in BUILTIN_TARGETS:
        return BUILTIN_TARGETS[spec]
    prefix, _colon, mutant = spec.partition(":")
    if prefix == "mutant":
        from properties.targets.mutants import MUTANTS, mutant_factory

        if mutant not in MUTANTS:
            raise TargetError(f"no mutant {mutant!r}; known: {', '.join(sorted(MUTANTS))}")
        return as_target(mutant_factory(mutant), spec)
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise TargetError(f"target {spec!r} is neither {sorted([*BUILTIN_TARGETS, 'sglang'])} nor 'module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or whatever the module raises as it runs
        raise TargetError(f"cannot import target module {module_name!r}: {type(error).__name__}: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise TargetError(f"{module_name!r} has no callable {attribute!r}")
    return as_target(factory, spec)


def as_target(target: "str | Factory | Target", name: str | None = None) -> Target:
    """A Target from a spec, a bare factory (its `contract` and `capabilities` attributes, else
    the whole SPEC), or a Target."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        return resolve_target(target)
    contract = getattr(target, "contract", SPEC_CONTRACT)
    if not isinstance(contract, TargetContract):
        raise TargetError(f"the contract of factory {target!r} is a {type(contract).__name__}, not a TargetContract")
    capabilities = getattr(target, "capabilities", FULL_CAPABILITIES)
    if not isinstance(capabilities, TargetCapabilities):
        raise TargetError(
            f"the capabilities of factory {target!r} are a {type(capabilities).__name__}, not TargetCapabilities"
        )
    return Target(name or str(getattr(target, "__name__", repr(target))), target, contract, capabilities)
