"""Divergence detector: hand-computed states, a loop reference, and torch / Triton agreement."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections import defaultdict
from dataclasses import astuple, dataclass, fields

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canary.divergence import DivergenceCounts, DivergenceInputError, detect_divergence

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
# The Triton kernels run compiled on CUDA, or interpreted on CPU when TRITON_INTERPRET=1 was set
# before the process started (never both in one process: the interpreter patches triton for good).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
can_run_triton = pytest.mark.skipif(
    not (HAS_TRITON and (HAS_CUDA or INTERPRET)),
    reason="the Triton kernels need CUDA, or on CPU their own run: TRITON_INTERPRET=1 pytest -m triton",
)
runs_triton = [pytest.mark.triton, can_run_triton]
requires_cuda_triton = pytest.mark.skipif(
    not (HAS_TRITON and HAS_CUDA and not INTERPRET), reason="needs CUDA and compiled triton"
)

FIELD_NAMES = [field.name for field in fields(DivergenceCounts)]


@pytest.fixture
def triton_ready() -> None:
    """The kernels are built the way this process runs them: interpreted exactly when asked."""
    assert importlib.import_module("canary.divergence.triton_backend").INTERPRETED == INTERPRET


@pytest.fixture(params=["torch", pytest.param("triton", marks=runs_triton)])
def impl(request) -> str:
    if request.param == "triton":
        request.getfixturevalue("triton_ready")
    return request.param


def device_for(impl: str) -> str:
    return "cuda" if impl == "triton" and HAS_CUDA and not INTERPRET else "cpu"


@dataclass
class Scan:
    """One detector input; `run` passes it to detect_divergence and returns plain lists."""

    req_to_token: list[list[int]]
    req_pool_indices: list[int]
    seq_lens: list[int]
    window: int
    mapping: list[int]
    swa_slots: int
    page_size: int = 1
    evict_floors: list[int] | None = None
    token_dtype: torch.dtype = torch.int32

    def tensors(self, device: str = "cpu") -> dict:
        return dict(
            req_to_token=torch.tensor(self.req_to_token, dtype=self.token_dtype, device=device).reshape(
                len(self.req_to_token), -1
            ),
            req_pool_indices=torch.tensor(self.req_pool_indices, dtype=torch.int64, device=device),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int64, device=device),
            window=self.window,
            mapping=torch.tensor(self.mapping, dtype=torch.int64, device=device),
            page_size=self.page_size,
            evict_floors=None
            if self.evict_floors is None
            else torch.tensor(self.evict_floors, dtype=torch.int64, device=device),
            swa_slots=self.swa_slots,
        )

    def run(self, impl: str) -> dict[str, list[int]]:
        counts = detect_divergence(**self.tensors(device_for(impl)), impl=impl)
        return {name: getattr(counts, name).tolist() for name in FIELD_NAMES}


def reference_counts(scan: Scan) -> dict[str, list[int]]:
    """The detector's definitions, one token at a time."""
    max_context = len(scan.req_to_token[0]) if scan.req_to_token else 0
    tokens = []  # (request, position, full, slot)
    for request, (row, seq_len) in enumerate(zip(scan.req_pool_indices, scan.seq_lens)):
        if not 0 <= row < len(scan.req_to_token):
            continue
        for position in range(min(max(seq_len, 0), max_context)):
            full = scan.req_to_token[row][position]
            slot = scan.mapping[full] if 0 <= full < len(scan.mapping) else 0
            tokens.append((request, position, full, slot))

    holders = defaultdict(set)
    for _, _, full, slot in tokens:
        if 0 < slot < scan.swa_slots:
            holders[slot].add(full)

    batch = len(scan.req_pool_indices)
    counts = {name: [0] * batch for name in FIELD_NAMES}
    counts["live"] = list(scan.seq_lens)
    for request, position, full, slot in tokens:
        seq_len = scan.seq_lens[request]
        window_start = max(0, seq_len - scan.window)
        if scan.evict_floors is None:
            boundary = window_start // scan.page_size * scan.page_size
        else:
            boundary = scan.evict_floors[request]
        holds = slot > 0
        if position >= window_start and not holds:
            counts["window_missing"][request] += 1
        if position < boundary:
            counts["leaked" if holds else "evicted"][request] += 1
        if holds and slot != full:
            counts["non_identity"][request] += 1
        if len(holders.get(slot, ())) >= 2:
            counts["shared"][request] += 1
    return counts


def quiet_except(batch: int, live: list[int], **nonzero: list[int]) -> dict[str, list[int]]:
    expected = {name: [0] * batch for name in FIELD_NAMES}
    expected["live"] = live
    expected.update(nonzero)
    return expected


# A correct state at page size 1, window 4: request 0 (row 1) has 6 tokens, full indices 1..6,
# positions 0-1 evicted, 2-5 paired with the identical SWA index; request 1 (row 0) has 3 tokens,
# full 7..9, all in the window. Full space 0..10, sentinel at 11; SWA space 0..10.
def healthy_scan() -> Scan:
    mapping = [0, 0, 0, 3, 4, 5, 6, 7, 8, 9, 0, -1]
    return Scan(
        req_to_token=[[7, 8, 9, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 0, 0]],
        req_pool_indices=[1, 0],
        seq_lens=[6, 3],
        window=4,
        mapping=mapping,
        swa_slots=11,
    )


def test_healthy_state_is_quiet(impl):
    assert healthy_scan().run(impl) == quiet_except(2, [6, 3], evicted=[2, 0])


def test_window_missing_fires_on_in_window_token_without_slot(impl):
    scan = healthy_scan()
    scan.mapping[5] = 0  # request 0, position 4
    scan.mapping[9] = 0  # request 1, position 2
    assert scan.run(impl) == quiet_except(2, [6, 3], evicted=[2, 0], window_missing=[1, 1])


def test_leaked_fires_on_evicted_token_still_holding_a_slot(impl):
    scan = healthy_scan()
    scan.mapping[1] = 1
    assert scan.run(impl) == quiet_except(2, [6, 3], evicted=[1, 0], leaked=[1, 0])


def test_non_identity_fires_on_swapped_pairs(impl):
    scan = healthy_scan()
    scan.mapping[7], scan.mapping[8] = 8, 7
    assert scan.run(impl) == quiet_except(2, [6, 3], evicted=[2, 0], non_identity=[0, 2])


def test_shared_fires_on_two_full_tokens_with_one_slot(impl):
    scan = healthy_scan()
    scan.mapping[8] = 4  # full 8 (request 1) now holds full 4's slot (request 0)
    assert scan.run(impl) == quiet_except(2, [6, 3], evicted=[2, 0], non_identity=[0, 1], shared=[1, 1])


def test_shared_slot_at_the_end_of_a_long_row(impl):
    # 40 tokens, window 8: only the last positions hold slots, so the fused kernel's early
    # blocks have nothing to share and the clash must still be found in the late one.
    full = list(range(1, 41))
    mapping = [0] * 42 + [-1]
    for token in full[32:]:
        mapping[token] = token
    mapping[full[39]] = full[33]
    scan = Scan(req_to_token=[full], req_pool_indices=[0], seq_lens=[40], window=8, mapping=mapping, swa_slots=42)
    assert scan.run(impl) == quiet_except(1, [40], evicted=[32], non_identity=[1], shared=[2])


def test_shared_prefix_rows_are_not_sharing(impl):
    # Both requests reference the same full tokens: one token each, so one holder per slot.
    scan = healthy_scan()
    scan.req_pool_indices = [1, 1]
    scan.seq_lens = [6, 6]
    assert scan.run(impl) == quiet_except(2, [6, 6], evicted=[2, 2])


def test_page_margin_is_neither_leaked_nor_missing(impl):
    # Page size 4, window 3, 10 tokens: window starts at 7, the evict boundary is 4, so
    # positions 4-6 are the margin: with or without a slot they are not reported.
    full = list(range(1, 11))
    mapping = [0] * 13 + [-1]
    for position in range(7, 10):
        mapping[full[position]] = full[position]
    scan = Scan(req_to_token=[full], req_pool_indices=[0], seq_lens=[10], window=3, mapping=mapping,
                swa_slots=13, page_size=4)
    assert scan.run(impl) == quiet_except(1, [10], evicted=[4])
    for position in range(4, 7):
        mapping[full[position]] = full[position]
    assert scan.run(impl) == quiet_except(1, [10], evicted=[4])


def test_evict_floors_replace_the_default_boundary(impl):
    scan = healthy_scan()
    scan.evict_floors = [1, 0]  # request 0 has only evicted position 0 so far
    scan.mapping[2] = 2
    assert scan.run(impl) == quiet_except(2, [6, 3], evicted=[1, 0])
    scan.evict_floors = [2, 0]
    assert scan.run(impl) == quiet_except(2, [6, 3], evicted=[1, 0], leaked=[1, 0])


def test_sentinel_and_out_of_range_full_indices_count_as_missing(impl):
    scan = healthy_scan()
    scan.req_to_token[0][1] = 11  # the sentinel entry
    scan.req_to_token[0][2] = 99
    assert scan.run(impl) == quiet_except(2, [6, 3], evicted=[2, 0], window_missing=[0, 2])


def test_out_of_range_rows_and_lengths_scan_safely(impl):
    scan = healthy_scan()
    scan.req_pool_indices = [5, 0]  # no such row: nothing is scanned for request 0
    scan.seq_lens = [6, 20]  # beyond the row: the whole row is scanned
    # Request 1's window is positions 16..19, past the row, so nothing is missing; the row's
    # zeros at positions 3..7 sit before the boundary 16 and count as evicted.
    assert scan.run(impl) == quiet_except(2, [6, 20], evicted=[0, 5], leaked=[0, 3])


def test_empty_batch(impl):
    scan = healthy_scan()
    scan.req_pool_indices, scan.seq_lens = [], []
    counts = detect_divergence(**scan.tensors(device_for(impl)), impl=impl)
    assert all(value.shape == (0,) for value in astuple(counts))
    assert counts.totals().tolist() == [0] * 6


def test_totals_sum_each_field_in_order():
    scan = healthy_scan()
    scan.mapping[1] = 1
    scan.mapping[8] = 4
    counts = detect_divergence(**scan.tensors(), impl="torch")
    assert counts.totals().dtype == torch.int64
    assert counts.totals().tolist() == [sum(value.tolist()) for value in astuple(counts)]
    assert counts.totals().tolist() == [9, 0, 1, 1, 1, 2]


def test_live_is_a_snapshot_of_seq_lens():
    inputs = healthy_scan().tensors()
    counts = detect_divergence(**inputs, impl="torch")
    inputs["seq_lens"].add_(1)
    assert counts.live.tolist() == [6, 3]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update(req_to_token=t["req_to_token"].float()), "req_to_token must be"),
        (lambda t: t.update(req_to_token=t["req_to_token"].flatten()), "2-D"),
        (lambda t: t.update(seq_lens=t["seq_lens"].int()), "seq_lens must be"),
        (lambda t: t.update(req_pool_indices=t["req_pool_indices"].tolist()), "torch.Tensor"),
        (lambda t: t.update(mapping=t["mapping"].int()), "mapping must be"),
        (lambda t: t.update(mapping=t["mapping"][:0]), "empty"),
        (lambda t: t.update(seq_lens=t["seq_lens"][:1]), "seq_lens has 1 entries"),
        (lambda t: t.update(evict_floors=torch.zeros(3, dtype=torch.int64)), "evict_floors has 3"),
        (lambda t: t.update(evict_floors=torch.zeros(2, dtype=torch.int32)), "evict_floors must be"),
        (lambda t: t.update(mapping=t["mapping"].to("meta")), "is on meta"),
        (lambda t: t.update(window=0), "window must be an int >= 1"),
        (lambda t: t.update(window=True), "window must be an int"),
        (lambda t: t.update(page_size=0), "page_size must be an int >= 1"),
        (lambda t: t.update(swa_slots=2.0), "swa_slots must be an int"),
        (lambda t: t.update(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_input_raises_typed_error(change, message):
    inputs = {**healthy_scan().tensors(), "impl": "torch"}
    snapshots = [(value, value.clone()) for value in inputs.values() if isinstance(value, torch.Tensor)]
    change(inputs)
    with pytest.raises(DivergenceInputError, match=message):
        detect_divergence(**inputs)
    assert all(torch.equal(value, snapshot) for value, snapshot in snapshots)


@requires_triton
def test_triton_on_cpu_without_interpreter_is_rejected():
    kernels = importlib.import_module("canary.divergence.triton_backend")
    if kernels.INTERPRETED:
        pytest.skip("kernels were built for the interpreter in this process")
    with pytest.raises(DivergenceInputError, match="needs CUDA tensors"):
        detect_divergence(**healthy_scan().tensors(), impl="triton")


@st.composite
def scans(draw, max_batch: int = 5, max_context: int = 24) -> Scan:
    """Small states with deliberately colliding values, so every count and edge case shows up."""
    num_rows = draw(st.integers(1, 5))
    context = draw(st.integers(0, max_context))
    mapping_len = draw(st.integers(1, 30))
    swa_slots = draw(st.integers(1, 16))
    batch = draw(st.integers(0, max_batch))
    full = st.integers(-2, mapping_len + 1)
    mapping = draw(st.lists(st.integers(-1, swa_slots + 2), min_size=mapping_len - 1, max_size=mapping_len - 1))
    seq_lens = draw(st.lists(st.integers(-2, context + 3), min_size=batch, max_size=batch))
    with_floors = draw(st.booleans())
    return Scan(
        req_to_token=[draw(st.lists(full, min_size=context, max_size=context)) for _ in range(num_rows)],
        req_pool_indices=draw(st.lists(st.integers(-1, num_rows), min_size=batch, max_size=batch)),
        seq_lens=seq_lens,
        window=draw(st.integers(1, 10)),
        mapping=mapping + [-1],
        swa_slots=swa_slots,
        page_size=draw(st.integers(1, 4)),
        evict_floors=draw(st.lists(st.integers(0, context + 2), min_size=batch, max_size=batch))
        if with_floors
        else None,
        token_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
    )


@settings(max_examples=300, deadline=None)
@given(scan=scans())
def test_torch_matches_loop_reference(scan):
    assert scan.run("torch") == reference_counts(scan)


@pytest.mark.triton
@can_run_triton
@settings(max_examples=200 if HAS_CUDA else 40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scan=scans(max_batch=3, max_context=40))
def test_triton_matches_torch(triton_ready, scan):
    assert scan.run("triton") == scan.run("torch")


def random_cuda_state(batch: int, max_context: int, window: int, page_size: int, generator: torch.Generator):
    """A serving-like batch: distinct full tokens per request, in-window tokens paired, plus a
    sprinkle of corruption (dropped, leaked, shared pairs) so every count is exercised."""
    num_rows = batch + 3
    size = num_rows * max_context
    swa_slots = size + page_size
    full = (torch.randperm(size, generator=generator) + 1).view(num_rows, max_context)
    seq_lens = torch.randint(0, max_context + 1, (batch,), generator=generator)
    rows = torch.randperm(num_rows, generator=generator)[:batch]
    mapping = torch.zeros(size + page_size + 1, dtype=torch.int64)
    mapping[-1] = -1
    positions = torch.arange(max_context)
    in_window = positions >= (seq_lens - window).clamp_min(0)[:, None]
    live = positions < seq_lens[:, None]
    paired = full[rows][in_window & live]
    mapping[paired] = torch.randperm(swa_slots - 1, generator=generator)[: paired.numel()] + 1
    corrupt = torch.randint(1, size + 1, (max(1, size // 50),), generator=generator)
    mapping[corrupt[0::3]] = 0
    mapping[corrupt[1::3]] = torch.randint(1, swa_slots, (corrupt[1::3].numel(),), generator=generator)
    return dict(
        req_to_token=full.int().cuda(),
        req_pool_indices=rows.cuda(),
        seq_lens=seq_lens.cuda(),
        window=window,
        mapping=mapping.cuda(),
        page_size=page_size,
        swa_slots=swa_slots,
    )


@pytest.mark.cuda
@requires_cuda_triton
@pytest.mark.parametrize("batch, max_context, window, page_size", [(7, 300, 64, 1), (64, 4096, 1024, 16),
                                                                    (256, 2048, 100, 64)])
def test_cuda_triton_matches_torch_without_host_sync(batch, max_context, window, page_size):
    generator = torch.Generator().manual_seed(batch * max_context + window)
    inputs = random_cuda_state(batch, max_context, window, page_size, generator)
    floors = dict(evict_floors=(inputs["seq_lens"] - window - 5).clamp_min(0))
    for extra in ({}, floors):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fused = detect_divergence(**inputs, **extra, impl="triton")
            fused_again = detect_divergence(**inputs, **extra, impl="triton")
            vectorised = detect_divergence(**inputs, **extra, impl="torch")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for name in FIELD_NAMES:
            assert getattr(fused, name).device == inputs["req_to_token"].device
            assert torch.equal(getattr(fused, name), getattr(vectorised, name)), name
            assert torch.equal(getattr(fused, name), getattr(fused_again, name)), name
        assert fused.totals()[1:].sum().item() > 0, "the corruption sprinkle should show up"
