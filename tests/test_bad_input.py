"""Bad input: every rejected call raises a typed AllocatorError and leaves the state as it was.

Each case builds an allocator in a known, non-trivial state (live slots, staged frees, a
mapping that is not the identity), makes one bad call, and compares the whole observable state
(free and staged lists of both pools, checked-mode bookkeeping, open free group, mapping,
available sizes) before and after. The snapshot and call-argument helpers defined here are
also what the other allocator test modules use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import pytest
import torch

from allocator import (
    AllocatorError,
    ContiguityError,
    DoubleFreeError,
    FreeGroupError,
    InvalidConfigError,
    InvalidIndexError,
    InvalidStateError,
    PagedTokenToKVPoolAllocator,
    SWAPeerHeldError,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    UnsupportedOperationError,
)


def pool_snapshot(pool: Any) -> dict:
    """One pool's observable state as plain Python values."""
    return {
        "free": pool.free_pages.tolist(),
        "staged": pool.release_pages.tolist(),
        "group": None if pool.free_group is None else [units.tolist() for units in pool.free_group],
        "allocated": None if pool.allocated is None else torch.nonzero(pool.allocated).flatten().tolist(),
        "available": pool.available_size(),
    }


def snapshot_state(allocator: Any) -> dict:
    """Everything a caller can observe of an allocator, as plain values that compare with ==."""
    if not isinstance(allocator, SWATokenToKVPoolAllocator):
        return {"pool": pool_snapshot(allocator)}
    return {
        "full": pool_snapshot(allocator.full_attn_allocator),
        "swa": pool_snapshot(allocator.swa_attn_allocator),
        "mapping": allocator.full_to_swa_index_mapping.tolist(),
        "available": allocator.available_size(),
    }


def other_device(device: torch.device) -> torch.device:
    """A device the allocator does not live on (the meta device when it lives on the CPU)."""
    return torch.device("cpu") if device.type != "cpu" else torch.device("meta")


def not_cpu(device: torch.device) -> torch.device:
    """A device that is not the CPU, for arguments that must be CPU copies."""
    return device if device.type != "cpu" else torch.device("meta")


def ids(values: list, device: torch.device) -> torch.Tensor:
    """An int64 index tensor on `device`."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def extend_args(device: torch.device, prefix: list[int], seq: list[int], last_loc: list[int]) -> list:
    """The six alloc_extend arguments, consistent with each other."""
    cpu = torch.device("cpu")
    return [ids(prefix, device), ids(prefix, cpu), ids(seq, device), ids(seq, cpu), ids(last_loc, device), sum(seq) - sum(prefix)]


def decode_args(device: torch.device, seq: list[int], last_loc: list[int]) -> list:
    """The three alloc_decode arguments, consistent with each other."""
    return [ids(seq, device), ids(seq, torch.device("cpu")), ids(last_loc, device)]


def with_argument(arguments: list, position: int, value: object) -> list:
    """`arguments` with the one at `position` replaced by a bad `value`."""
    return [value if index == position else argument for index, argument in enumerate(arguments)]


# ------------------------------------------------------------------ states
def token_pair(device: torch.device) -> SWATokenToKVPoolAllocator:
    """ps 1, need_sort, checked. Full live {1, 3, 4}, staged [2]; SWA live {1, 4}, staged [2, 3]."""
    allocator = SWATokenToKVPoolAllocator(8, 6, 1, torch.float16, device, need_sort=True, checked=True)
    allocator.alloc(4)
    allocator.free(ids([2], device))
    allocator.free_swa(ids([3], device))
    return allocator


def paged_pair(device: torch.device) -> SWATokenToKVPoolAllocator:
    """ps 4, need_sort, checked. Request A: positions 0..5 on full pages 1-2 / SWA pages 1-2
    (last_loc 9). Request B: positions 0..2 on full page 3, its SWA page released. Page 4 was
    used and freed, so it is staged on both pools."""
    allocator = SWATokenToKVPoolAllocator(32, 24, 4, torch.float16, device, need_sort=True, checked=True)
    allocator.alloc_extend(*extend_args(device, [0, 0, 0], [6, 3, 4], [-1, -1, -1]))
    allocator.free_swa(ids([12], device))
    allocator.free(ids([16, 17, 18, 19], device))
    return allocator


def in_free_group(build: Callable[[torch.device], Any]) -> Callable[[torch.device], Any]:
    def build_with_open_group(device: torch.device) -> Any:
        allocator = build(device)
        allocator.free_group_begin()
        allocator.free(ids([1], device))
        return allocator

    return build_with_open_group


def token_pool(device: torch.device) -> TokenToKVPoolAllocator:
    pool = TokenToKVPoolAllocator(8, torch.float16, device, checked=True)
    pool.alloc(3)
    return pool


def paged_pool(device: torch.device) -> PagedTokenToKVPoolAllocator:
    """Pages 1 and 2 handed out, then page 1 freed again (it is back at the front)."""
    pool = PagedTokenToKVPoolAllocator(16, 4, torch.float16, device, checked=True)
    pool.alloc(8)
    pool.free(ids([5], device))
    return pool


# ------------------------------------------------------------ bad states
def fresh_state(allocator: SWATokenToKVPoolAllocator, device: torch.device, extra_size: int = 0) -> object:
    """The state of a new allocator configured like `allocator` (`extra_size` more full slots)."""
    other = SWATokenToKVPoolAllocator(
        allocator.size + extra_size, allocator.size_swa, allocator.page_size, torch.float16, device,
        need_sort=allocator.need_sort, checked=allocator.checked,
    )
    return other.backup_state()


def with_mapping(allocator: SWATokenToKVPoolAllocator, edit: Callable[[torch.Tensor], torch.Tensor]) -> object:
    state = allocator.backup_state()
    return replace(state, mapping=edit(state.mapping.clone()))


def without_sentinel(mapping: torch.Tensor) -> torch.Tensor:
    mapping[-1] = 0
    return mapping


def with_swa_free_list(allocator: SWATokenToKVPoolAllocator, edit: Callable[[torch.Tensor], torch.Tensor]) -> object:
    state = allocator.backup_state()
    return replace(state, swa=replace(state.swa, free_pages=edit(state.swa.free_pages)))


@dataclass(frozen=True)
class BadCall:
    name: str
    build: Callable[[torch.device], Any]
    call: Callable[[Any, torch.device], object]
    error: type[AllocatorError]


BAD_CALLS = [
    # index tensors: dtype, shape, type, device
    BadCall("free-int32", token_pair, lambda a, d: a.free(torch.tensor([1], dtype=torch.int32, device=d)), InvalidIndexError),
    BadCall("free-2d", token_pair, lambda a, d: a.free(ids([[1]], d)), InvalidIndexError),
    BadCall("free-list", token_pair, lambda a, d: a.free([1]), InvalidIndexError),
    BadCall("free-other-device", token_pair, lambda a, d: a.free(ids([1], other_device(d))), InvalidIndexError),
    BadCall("free-swa-float", token_pair, lambda a, d: a.free_swa(torch.tensor([1.0], device=d)), InvalidIndexError),
    BadCall("decode-int32", paged_pair, lambda a, d: a.alloc_decode(
        *with_argument(decode_args(d, [7], [9]), 0, torch.tensor([7], dtype=torch.int32, device=d))
    ), InvalidIndexError),
    BadCall("extend-cpu-copy-on-device", paged_pair, lambda a, d: a.alloc_extend(
        *with_argument(extend_args(d, [6], [8], [9]), 1, ids([6], not_cpu(d)))
    ), InvalidIndexError),
    BadCall("extend-last-loc-too-long", paged_pair, lambda a, d: a.alloc_extend(
        *with_argument(extend_args(d, [6], [8], [9]), 4, ids([9, 9], d))
    ), InvalidIndexError),
    # out-of-range and padding indices
    BadCall("free-past-end", token_pair, lambda a, d: a.free(ids([9], d)), InvalidIndexError),
    BadCall("free-padding-slot", token_pair, lambda a, d: a.free(ids([1, 0], d)), InvalidIndexError),
    BadCall("free-negative", token_pair, lambda a, d: a.free(ids([-1], d)), InvalidIndexError),
    BadCall("free-padding-page", paged_pair, lambda a, d: a.free(ids([3], d)), InvalidIndexError),
    BadCall("free-past-last-page", paged_pair, lambda a, d: a.free(ids([36], d)), InvalidIndexError),
    BadCall("translate-past-mapping", token_pair, lambda a, d: a.translate_loc_from_full_to_swa(ids([9], d)), InvalidIndexError),
    BadCall("translate-below-sentinel", token_pair, lambda a, d: a.translate_loc_from_full_to_swa(ids([-2], d)), InvalidIndexError),
    BadCall("extend-last-loc-in-padding-page", paged_pair, lambda a, d: a.alloc_extend(*extend_args(d, [2], [3], [1])), InvalidIndexError),
    BadCall("extend-last-loc-in-free-page", paged_pair, lambda a, d: a.alloc_extend(*extend_args(d, [2], [3], [25])), InvalidIndexError),
    BadCall("extend-swa-peer-released", paged_pair, lambda a, d: a.alloc_extend(*extend_args(d, [3], [5], [14])), InvalidIndexError),
    BadCall("token-pool-free-padding", token_pool, lambda p, d: p.free(ids([0], d)), InvalidIndexError),
    # counts and lengths
    BadCall("alloc-negative", token_pair, lambda a, d: a.alloc(-1), InvalidIndexError),
    BadCall("alloc-float", token_pair, lambda a, d: a.alloc(2.0), InvalidIndexError),
    BadCall("alloc-bool", token_pair, lambda a, d: a.alloc(True), InvalidIndexError),
    BadCall("paged-pool-alloc-partial-page", paged_pool, lambda p, d: p.alloc(6), InvalidIndexError),
    BadCall("extend-num-tokens-too-large", paged_pair, lambda a, d: a.alloc_extend(
        *with_argument(extend_args(d, [6], [8], [9]), 5, 3)
    ), InvalidIndexError),
    BadCall("extend-num-tokens-tensor", paged_pair, lambda a, d: a.alloc_extend(
        *with_argument(extend_args(d, [6], [8], [9]), 5, torch.tensor(2))
    ), InvalidIndexError),
    BadCall("extend-seq-below-prefix", paged_pair, lambda a, d: a.alloc_extend(*extend_args(d, [6], [5], [9])), InvalidIndexError),
    BadCall("extend-copies-differ", paged_pair, lambda a, d: a.alloc_extend(
        *with_argument(extend_args(d, [6], [8], [9]), 3, ids([9], torch.device("cpu")))
    ), InvalidIndexError),
    BadCall("decode-empty-request", paged_pair, lambda a, d: a.alloc_decode(*decode_args(d, [0], [-1])), InvalidIndexError),
    BadCall("swa-tail-longer-than-extend", paged_pair, lambda a, d: a.alloc_extend_swa_tail(
        *extend_args(d, [6], [8], [9]), 3
    ), InvalidIndexError),
    BadCall("swa-tail-two-requests", paged_pair, lambda a, d: a.alloc_extend_swa_tail(
        *extend_args(d, [6, 0], [8, 2], [9, -1]), 1
    ), InvalidIndexError),
    # contiguity
    BadCall("extend-not-contiguous", paged_pair, lambda a, d: a.alloc_extend(*extend_args(d, [6], [8], [10])), ContiguityError),
    BadCall("extend-new-page-with-last-loc", paged_pair, lambda a, d: a.alloc_extend(*extend_args(d, [0], [2], [9])), ContiguityError),
    BadCall("decode-not-contiguous", paged_pair, lambda a, d: a.alloc_decode(*decode_args(d, [8], [9])), ContiguityError),
    # calls that do not exist at this page size
    BadCall("alloc-with-pages", paged_pair, lambda a, d: a.alloc(4), UnsupportedOperationError),
    BadCall("extend-at-page-size-1", token_pair, lambda a, d: a.alloc_extend(*extend_args(d, [0], [2], [-1])), UnsupportedOperationError),
    BadCall("decode-at-page-size-1", token_pair, lambda a, d: a.alloc_decode(*decode_args(d, [2], [1])), UnsupportedOperationError),
    BadCall("swa-tail-at-page-size-1", token_pair, lambda a, d: a.alloc_extend_swa_tail(
        *extend_args(d, [0], [2], [-1]), 1
    ), UnsupportedOperationError),
    # saved states
    BadCall("restore-dict", token_pair, lambda a, d: a.restore_state({}), InvalidStateError),
    BadCall("restore-pool-state", token_pair, lambda a, d: a.restore_state(a.backup_state().full), InvalidStateError),
    BadCall("restore-other-size", token_pair, lambda a, d: a.restore_state(fresh_state(a, d, extra_size=1)), InvalidStateError),
    BadCall("restore-float-free-list", token_pair, lambda a, d: a.restore_state(with_swa_free_list(a, torch.Tensor.float)), InvalidStateError),
    BadCall("restore-padding-in-free-list", token_pair, lambda a, d: a.restore_state(
        with_swa_free_list(a, lambda free: torch.cat((free, free.new_zeros(1))))
    ), InvalidStateError),
    BadCall("restore-slot-past-end-in-free-list", token_pair, lambda a, d: a.restore_state(
        with_swa_free_list(a, lambda free: free + 6)
    ), InvalidStateError),
    BadCall("restore-float-mapping", token_pair, lambda a, d: a.restore_state(with_mapping(a, lambda m: m.double())), InvalidStateError),
    BadCall("restore-mapping-without-sentinel", token_pair, lambda a, d: a.restore_state(with_mapping(a, without_sentinel)), InvalidStateError),
    # free groups
    BadCall("group-end-without-begin", token_pair, lambda a, d: a.free_group_end(), FreeGroupError),
    BadCall("group-nested-begin", in_free_group(token_pair), lambda a, d: a.free_group_begin(), FreeGroupError),
    BadCall("backup-inside-group", in_free_group(token_pair), lambda a, d: a.backup_state(), FreeGroupError),
    BadCall("restore-inside-group", in_free_group(token_pair), lambda a, d: a.restore_state(fresh_state(a, d)), FreeGroupError),
    # checked mode: frees of slots that are not allocated
    BadCall("free-names-slot-twice", token_pair, lambda a, d: a.free(ids([4, 1, 4], d)), DoubleFreeError),
    BadCall("free-swa-of-freed-slot", token_pair, lambda a, d: a.free_swa(ids([2], d)), DoubleFreeError),
    BadCall("free-full-of-freed-slot", token_pair, lambda a, d: a.free_full(ids([3, 2], d)), DoubleFreeError),
    BadCall("free-full-with-live-peer-among-others", token_pair, lambda a, d: a.free_full(ids([3, 4], d)), SWAPeerHeldError),
    BadCall("free-freed-page", paged_pair, lambda a, d: a.free(ids([8, 17], d)), DoubleFreeError),
    BadCall("free-swa-of-never-allocated-page", paged_pair, lambda a, d: a.free_swa(ids([20], d)), DoubleFreeError),
    BadCall("paged-pool-free-freed-page", paged_pool, lambda p, d: p.free(ids([4, 8], d)), DoubleFreeError),
    BadCall("token-pool-free-free-slot", token_pool, lambda p, d: p.free(ids([2, 5], d)), DoubleFreeError),
    BadCall("free-in-group-of-slot-freed-in-group", in_free_group(token_pair), lambda a, d: a.free(ids([1], d)), DoubleFreeError),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[case.name for case in BAD_CALLS])
def test_bad_call_raises_typed_error_and_changes_nothing(case: BadCall, swa_device: torch.device) -> None:
    allocator = case.build(swa_device)
    before = snapshot_state(allocator)
    with pytest.raises(case.error) as raised:
        case.call(allocator, swa_device)
    assert isinstance(raised.value, AllocatorError)
    assert str(raised.value), "the error must say what was wrong"
    assert snapshot_state(allocator) == before


BAD_CONFIGS = {
    "size-zero": lambda d: SWATokenToKVPoolAllocator(0, 8, 1, torch.float16, d),
    "size-swa-negative": lambda d: SWATokenToKVPoolAllocator(8, -4, 1, torch.float16, d),
    "size-not-multiple-of-page": lambda d: SWATokenToKVPoolAllocator(10, 8, 4, torch.float16, d),
    "size-swa-not-multiple-of-page": lambda d: SWATokenToKVPoolAllocator(8, 10, 4, torch.float16, d),
    "page-size-zero": lambda d: SWATokenToKVPoolAllocator(8, 8, 0, torch.float16, d),
    "page-size-negative": lambda d: SWATokenToKVPoolAllocator(8, 8, -2, torch.float16, d),
    "size-float": lambda d: SWATokenToKVPoolAllocator(8.0, 8, 1, torch.float16, d),
    "size-swa-string": lambda d: SWATokenToKVPoolAllocator(8, "8", 1, torch.float16, d),
    "size-bool": lambda d: SWATokenToKVPoolAllocator(True, 8, 1, torch.float16, d),
    "page-size-float": lambda d: SWATokenToKVPoolAllocator(8, 8, 2.0, torch.float16, d),
    "token-pool-size-zero": lambda d: TokenToKVPoolAllocator(0, torch.float16, d),
    "paged-pool-size-not-multiple": lambda d: PagedTokenToKVPoolAllocator(6, 4, torch.float16, d),
    "paged-pool-page-size-zero": lambda d: PagedTokenToKVPoolAllocator(8, 0, torch.float16, d),
    "device-tpu": lambda d: SWATokenToKVPoolAllocator(8, 8, 1, torch.float16, "tpu"),
    "device-an-int": lambda d: SWATokenToKVPoolAllocator(8, 8, 1, torch.float16, 3),
    "device-cuda-missing": lambda d: SWATokenToKVPoolAllocator(8, 8, 1, torch.float16, missing_cuda_device()),
    "dtype-banana": lambda d: SWATokenToKVPoolAllocator(8, 8, 1, "banana", d),
    "token-pool-dtype-banana": lambda d: TokenToKVPoolAllocator(8, "banana", d),
}


def missing_cuda_device() -> str:
    """A CUDA device torch cannot use here: cuda without a GPU, else one past the last GPU."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("build", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_invalid_construction_raises_config_error(build: Callable, swa_device: torch.device) -> None:
    with pytest.raises(InvalidConfigError) as raised:
        build(swa_device)
    assert isinstance(raised.value, AllocatorError)


@pytest.mark.parametrize(
    "call, names, not_named",
    [
        (lambda a, d: a.alloc_decode(*decode_args(d, [0], [-1])), "every seq_len of a decode must be >= 1", "prefix_len"),
        (lambda a, d: a.alloc_extend(*extend_args(d, [6], [5], [9])), "every seq_len must be >= its prefix_len", "at least 0"),
    ],
    ids=["decode-seq-len-zero", "extend-seq-below-prefix"],
)
def test_length_errors_name_the_parameter_that_is_wrong(
    call: Callable, names: str, not_named: str, swa_device: torch.device
) -> None:
    allocator = paged_pair(swa_device)
    with pytest.raises(InvalidIndexError) as raised:
        call(allocator, swa_device)
    assert names in str(raised.value) and not_named not in str(raised.value)
