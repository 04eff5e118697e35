"""The runtime canary: every probe violation and detector count is reported (once) from a
crafted state and nowhere else; records round-trip through their parser; the read-back is
double-buffered and never waits; warn mode survives its own failures, strict mode raises;
snapshots replay offline. CUDA tests check sync-freedom and CUDA-graph capture."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import pytest
import torch
from test_probes import BUGS, Bug, NoHostSync, allocate, as_tensor, build

from allocator import SWATokenToKVPoolAllocator
from canary import sweep as sweep_module
from canary.invariants import InvariantViolation, Name, Severity
from canary.monitor import CanaryConfigError, CanaryMonitor, attach
from canary.probes import AllocatorView, ProbeInputError
from canary.report import (
    DISABLED_PREFIX,
    CanaryRecord,
    MetricsUnavailableError,
    RecordFormatError,
    format_record,
    parse_record,
)
from canary.snapshot import Snapshot, SnapshotError, replay
from canary.sweep import Batch
from properties.cli import main

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
WINDOW = 4


@pytest.fixture
def logger() -> logging.Logger:
    """A logger of its own per test, so caplog sees only this test's monitor."""
    logger = logging.getLogger(f"swa_canary.test.{id(object())}")
    logger.setLevel(logging.DEBUG)
    return logger


def canary_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("SWA_CANARY")]


def reported(monitor: CanaryMonitor) -> dict[tuple[str, str], tuple[int, ...]]:
    return {(r.source, r.invariant): r.indices for r in monitor.recent()}


# --------------------------------------------------------- crafted batches
class Served:
    """A reference allocator serving requests the way a scheduler does: a req_to_token row
    per request, and the SWA slots of tokens before the (page-floored) window released."""

    def __init__(self, page_size: int = 1, size: int = 64, size_swa: int = 32, device: str = "cpu") -> None:
        self.allocator = SWATokenToKVPoolAllocator(size, size_swa, page_size, torch.float16, device)
        self.device = torch.device(device)
        self.req_to_token = torch.zeros((4, 32), dtype=torch.int64, device=self.device)
        self.rows: list[int] = []
        self.lengths: list[int] = []
        self.floors: list[int] = []

    def add(self, tokens: int, evict: bool = True) -> list[int]:
        """A new request of `tokens` tokens; returns its full tokens."""
        full = allocate(self.allocator, tokens)
        row = len(self.rows)
        self.req_to_token[row, :tokens] = as_tensor(full, self.device)
        ps = self.allocator.page_size
        floor = max(0, tokens - WINDOW) // ps * ps
        if evict and floor:
            self.allocator.free_swa(as_tensor(full[:floor], self.device))
        self.rows.append(row)
        self.lengths.append(tokens)
        self.floors.append(floor)
        return full

    def batch(self) -> dict[str, torch.Tensor]:
        return {
            "req_to_token": self.req_to_token,
            "req_pool_indices": as_tensor(self.rows, self.device),
            "seq_lens": as_tensor(self.lengths, self.device),
            "evict_floors": as_tensor(self.floors, self.device),
        }

    @property
    def mapping(self) -> torch.Tensor:
        return self.allocator.full_to_swa_index_mapping


def watch(served: Served, logger: logging.Logger, **options) -> CanaryMonitor:
    options = {"every": 1, "window": WINDOW, "logger": logger, **options}
    return attach(served.allocator, **options)


# ------------------------------------------------- every probe violation
@pytest.mark.parametrize("bug", BUGS.values(), ids=BUGS.keys())
def test_each_probe_violation_is_reported_once_with_its_items(
    bug: Bug, logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    allocator = build(bug.allocator, bug, torch.device("cpu"))
    bug.scenario(allocator)
    monitor = attach(allocator, every=1, logger=logger)
    for _ in range(5):
        monitor.step()
    records = monitor.recent()
    assert {r.invariant: list(r.indices) for r in records} == bug.fires
    assert len(records) == len(bug.fires)
    assert all(r.source == "probe" and r.checked_step == r.reported_step == 1 for r in records)
    assert [parse_record(line) for line in canary_lines(caplog)] == records
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert all(
        levels[format_record(r)] == (logging.ERROR if r.severity == "FATAL" else logging.WARNING) for r in records
    )
    stats = monitor.stats()
    assert stats.checks == 5 and stats.records == len(bug.fires)
    assert stats.by_invariant == {(r.invariant, r.severity): 1 for r in records}


@pytest.mark.parametrize("bug", BUGS.values(), ids=BUGS.keys())
def test_the_reference_allocator_reports_nothing(bug: Bug, logger: logging.Logger) -> None:
    allocator = build(SWATokenToKVPoolAllocator, bug, torch.device("cpu"))
    bug.scenario(allocator)
    monitor = attach(allocator, every=1, logger=logger)
    for _ in range(3):
        monitor.step()
    assert monitor.recent() == [] and monitor.stats().checks == 3


# ------------------------------------------------ every detector count
@pytest.mark.parametrize("page_size", [1, 4])
def test_a_correctly_served_batch_is_quiet(page_size: int, logger: logging.Logger) -> None:
    served = Served(page_size)
    served.add(8)
    served.add(13 if page_size == 1 else 12)
    monitor = watch(served, logger)
    monitor.step(**served.batch())
    assert monitor.recent() == []
    totals = monitor.stats().divergence
    assert totals["live"] == sum(served.lengths)
    assert totals["window_missing"] == totals["leaked"] == totals["shared"] == 0
    assert totals["evicted"] == sum(served.floors)


def test_window_missing_is_reported_as_window(logger: logging.Logger) -> None:
    served = Served()
    served.add(6)
    tokens = served.add(8)
    served.allocator.free_swa(as_tensor(tokens[5:6], served.device))  # evicts a token inside the window
    monitor = watch(served, logger)
    monitor.step(**served.batch())
    # A legal free_swa call: the allocator state is consistent, only the batch shows it.
    assert reported(monitor) == {("divergence", Name.WINDOW): (1,)}
    record = monitor.recent()[0]
    assert (record.severity, record.count) == ("FATAL", 1)
    assert monitor.stats().divergence["window_missing"] == 1


def test_leaked_is_reported_as_leak(logger: logging.Logger) -> None:
    served = Served()
    served.add(8, evict=False)  # its evict floor says 4, but nothing was released
    monitor = watch(served, logger)
    monitor.step(**served.batch())
    assert reported(monitor) == {("divergence", Name.LEAK): (0,)}
    assert (monitor.recent()[0].severity, monitor.recent()[0].count) == ("GUARD", 4)


def test_shared_slots_are_reported_as_swa_le_full(logger: logging.Logger) -> None:
    served = Served()
    first = served.add(4)
    second = served.add(4)
    served.mapping[second[3]] = served.mapping[first[3]]
    monitor = watch(served, logger)
    monitor.step(**served.batch())
    found = reported(monitor)
    assert found[("divergence", Name.SWA_LE_FULL)] == (0, 1)
    assert monitor.stats().divergence["shared"] == 2
    # The probes see it too: slot 4 has two peers, and slot 8 (the second token's) has none.
    assert found[("probe", Name.SWA_LE_FULL)] == (first[3], second[3]) == (4, 8)


def test_non_identity_is_counted_not_reported(logger: logging.Logger) -> None:
    served = Served()
    evicted = allocate(served.allocator, 4)
    served.allocator.free_swa(as_tensor(evicted, served.device))  # SWA slots 1..4 go to the back
    served.add(30, evict=False)  # full 5..34, SWA 5..32 then 1, 2
    served.floors[0] = 0
    monitor = watch(served, logger)
    monitor.step(**served.batch())
    assert monitor.recent() == []
    assert monitor.stats().divergence["non_identity"] == 2


def test_a_step_without_a_batch_or_window_runs_only_the_probes(logger: logging.Logger) -> None:
    served = Served()
    served.add(8, evict=False)
    no_window = attach(served.allocator, every=1, logger=logger)
    no_window.step(**served.batch())
    with_window = watch(served, logger)
    with_window.step()
    for monitor in (no_window, with_window):
        assert monitor.recent() == [] and monitor.stats().divergence is None


# ------------------------------------------------------------- records
def sample_record(**changes) -> CanaryRecord:
    record = CanaryRecord(
        invariant=Name.WINDOW, severity="FATAL", source="divergence", count=3, indices=(4, 7),
        detail="in-window tokens",
        checked_step=16, reported_step=17, monitor="m", snapshot="/tmp/s.pt", time=1700000000.25,
    )
    return replace(record, **changes)


@pytest.mark.parametrize("record", [sample_record(), sample_record(snapshot=None, indices=(), source="probe",
                                                                   invariant=Name.STALE, severity="GUARD")])
def test_records_round_trip_through_the_parser(record: CanaryRecord) -> None:
    line = format_record(record)
    assert "\n" not in line and line.startswith("SWA_CANARY {")
    assert parse_record(line) == record
    assert parse_record(f"2025-01-01 12:00:00 ERROR swa_canary: {line}") == record
    assert parse_record(format_record(replace(record, detail="two\nlines"))).detail == "two\nlines"


def corrupt_line(**fields) -> str:
    body = format_record(sample_record())
    for key, value in fields.items():
        body = body.replace(key, value, 1)
    return body


@pytest.mark.parametrize(
    "line, message",
    [
        ("", "no 'SWA_CANARY' record"),
        ("INFO something else happened", "no 'SWA_CANARY' record"),
        ("SWA_CANARY ", "not JSON"),
        ("SWA_CANARY {\"schema\": 1", "not JSON"),
        ("SWA_CANARY [1, 2]", "not an object"),
        (corrupt_line(**{'"schema":1': '"schema":2'}), "schema is not 1"),
        (corrupt_line(**{'"count":3,': ""}), "missing \\['count'\\]"),
        (corrupt_line(**{'"count":3': '"count":3,"extra":1'}), "unexpected \\['extra'\\]"),
        (corrupt_line(**{'"count":3': '"count":"3"'}), "'count' has the wrong type"),
        (corrupt_line(**{'"count":3': '"count":true'}), "'count' has the wrong type"),
        (corrupt_line(**{'"count":3': '"count":0'}), "count 0 is not positive"),
        (corrupt_line(**{"[4,7]": '[4,"7"]'}), "a record index must be an int"),
        (corrupt_line(**{'"WINDOW"': '"WINDOWS"'}), "unknown invariant"),
        (corrupt_line(**{'"FATAL"': '"GUARD"'}), "WINDOW is FATAL"),
        (corrupt_line(**{'"divergence"': '"model"'}), "source 'model'"),
        (format_record(sample_record()) + " trailing", "text after the record"),
    ],
)
def test_the_parser_rejects_what_is_not_a_record(line: str, message: str) -> None:
    with pytest.raises(RecordFormatError, match=message):
        parse_record(line)


def test_the_parser_rejects_non_strings() -> None:
    with pytest.raises(RecordFormatError, match="is a str"):
        parse_record(b"SWA_CANARY {}")


# ------------------------------------------------------- dedupe and ring
def stale_on(allocator: SWATokenToKVPoolAllocator, token: int) -> None:
    """Token `token` (of a free full slot) alone maps to an SWA slot."""
    mapping = allocator.full_to_swa_index_mapping
    mapping[:-1] = 0
    mapping[token] = 1


def test_a_violation_is_reported_again_only_when_its_items_change(logger: logging.Logger) -> None:
    allocator = SWATokenToKVPoolAllocator(64, 32, 1, torch.float16, "cpu")
    monitor = attach(allocator, every=1, probes=[Name.STALE], logger=logger)
    stale_on(allocator, 5)
    for _ in range(10):
        monitor.step()
    stale_on(allocator, 6)
    monitor.step()
    stale_on(allocator, 5)  # seen before: not reported again
    monitor.step()
    assert [(r.invariant, r.indices, r.checked_step) for r in monitor.recent()] == [
        (Name.STALE, (5,), 1), (Name.STALE, (6,), 11)
    ]


def test_the_ring_keeps_only_the_latest_records(logger: logging.Logger) -> None:
    allocator = SWATokenToKVPoolAllocator(64, 32, 1, torch.float16, "cpu")
    monitor = attach(allocator, every=1, probes=[Name.STALE], logger=logger, ring_size=3)
    for token in range(1, 11):
        stale_on(allocator, token)
        monitor.step()
    assert [r.indices for r in monitor.recent()] == [(8,), (9,), (10,)]
    assert monitor.stats().records == 10


def test_checks_run_every_n_steps(logger: logging.Logger) -> None:
    allocator = build(BUGS[Name.SENTINEL].allocator, BUGS[Name.SENTINEL], torch.device("cpu"))
    BUGS[Name.SENTINEL].scenario(allocator)
    monitor = attach(allocator, every=4, logger=logger)
    for _ in range(3):
        monitor.step()
    assert monitor.recent() == [] and monitor.stats().checks == 0
    monitor.step()
    assert [r.checked_step for r in monitor.recent()] == [4]
    for _ in range(8):
        monitor.step()
    assert monitor.stats().checks == 3


# ------------------------------------------------- double-buffered read-back
class FakeEvent:
    """Stands in for a CUDA event: done only when the test says so (or on synchronize)."""

    def __init__(self) -> None:
        self.done = True

    def record(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


@pytest.mark.parametrize("page_size", [1, 4])
def test_checks_in_flight_are_read_when_done_and_skipped_when_both_slots_are_busy(
    page_size: int, logger: logging.Logger, tmp_path
) -> None:
    served = Served(page_size)
    served.add(8)
    served.add(12)
    served.mapping[-1] = 0
    batch = served.batch()
    monitor = watch(served, logger, snapshot_dir=tmp_path)
    events = [FakeEvent(), FakeEvent()]
    for slot, event in zip(monitor._slots, events):
        slot.event = event
    with NoHostSync():  # queueing a check (probes, detector, snapshot copies) reads nothing back
        for _ in range(3):
            monitor.step(**batch)  # the third finds both slots in flight: skipped
    assert monitor.recent() == [] and monitor.stats().skipped == 1
    events[0].done = True
    monitor.step(**batch)
    assert [(r.invariant, r.checked_step, r.reported_step) for r in monitor.recent()] == [(Name.SENTINEL, 1, 4)]
    assert Snapshot.load(monitor.recent()[0].snapshot).step == 1
    monitor.flush()  # steps 2 and 4: the same violation, not reported again
    assert len(monitor.recent()) == 1 and monitor.stats().checks == 3
    assert all(event.done for event in events)


# ------------------------------------------------------------------ modes
def test_warn_mode_survives_a_failing_probe_and_disables_itself_with_one_line(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = Served()
    served.add(8)
    monitor = watch(served, logger)

    def broken_probes(*args, **kwargs):
        raise RuntimeError("probe kernel failed\nsecond line")

    monkeypatch.setattr(sweep_module, "run_probes", broken_probes)
    for _ in range(5):
        monitor.step(**served.batch())
    monitor.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(DISABLED_PREFIX)
    assert "RuntimeError: probe kernel failed | second line" in lines[0]
    assert not monitor.enabled and monitor.stats().steps == 1


def test_warn_mode_survives_a_bad_batch(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    served = Served()
    served.add(8)
    monitor = watch(served, logger)
    batch = served.batch()
    monitor.step(**{**batch, "seq_lens": batch["seq_lens"].int()})
    monitor.step(req_to_token=batch["req_to_token"])
    assert [r.getMessage()[: len(DISABLED_PREFIX)] for r in caplog.records] == [DISABLED_PREFIX]
    assert "seq_lens must be torch.int64" in caplog.records[0].getMessage()


def test_strict_mode_raises_on_fatal(logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    allocator = build(BUGS[Name.SENTINEL].allocator, BUGS[Name.SENTINEL], torch.device("cpu"))
    BUGS[Name.SENTINEL].scenario(allocator)
    monitor = attach(allocator, every=1, mode="strict", logger=logger)
    with pytest.raises(InvariantViolation) as raised:
        monitor.step()
    assert raised.value.invariant == Name.SENTINEL and raised.value.severity is Severity.FATAL
    monitor.step()  # reported once: it does not raise again
    monkeypatch.setattr(sweep_module, "run_probes", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # strict mode hides nothing
        monitor.step()


def test_strict_mode_logs_guard_violations_without_raising(logger: logging.Logger) -> None:
    allocator = build(BUGS[Name.STALE].allocator, BUGS[Name.STALE], torch.device("cpu"))
    BUGS[Name.STALE].scenario(allocator)
    monitor = attach(allocator, every=1, mode="strict", logger=logger)
    monitor.step()
    assert [(r.invariant, r.severity) for r in monitor.recent()] == [(Name.STALE, "GUARD")]


def test_off_mode_does_nothing(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    monitor = attach(object(), mode="off", logger=logger)  # not even an allocator: never read
    for _ in range(20):
        monitor.step()
    monitor.flush()
    assert monitor.recent() == [] and caplog.records == []
    assert monitor.stats().steps == 0 and not monitor.enabled


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"mode": "loud"}, CanaryConfigError, "mode must be one of"),
        ({"every": 0}, CanaryConfigError, "every must be an int >= 1"),
        ({"every": True}, CanaryConfigError, "every must be an int"),
        ({"window": 0}, CanaryConfigError, "window must be an int >= 1"),
        ({"page_size": 2.0}, CanaryConfigError, "page_size must be an int"),
        ({"ring_size": 0}, CanaryConfigError, "ring_size must be an int >= 1"),
        ({"max_indices": -1}, CanaryConfigError, "max_indices must be an int >= 0"),
        ({"probes": ["NOPE"]}, ProbeInputError, "unknown invariant 'NOPE'"),
    ],
)
def test_attach_rejects_bad_options(options: dict, error: type, message: str) -> None:
    allocator = SWATokenToKVPoolAllocator(64, 32, 1, torch.float16, "cpu")
    with pytest.raises(error, match=message):
        attach(allocator, **options)


def test_attach_in_strict_mode_rejects_what_is_not_an_allocator() -> None:
    with pytest.raises(ProbeInputError, match="is not an SWA allocator"):
        attach(object(), mode="strict")


def test_attach_in_warn_mode_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    """Warn mode must never take the server down, at attach either: the monitor logs one line
    and stays off."""
    with caplog.at_level(logging.ERROR, logger="swa_canary"):
        monitor = attach(object(), mode="warn")
        monitor.step()
        monitor.flush()
    assert not monitor.enabled and monitor.stats().checks == 0
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "is not an SWA allocator" in lines[0] and "\n" not in lines[0]


# ---------------------------------------------------------------- metrics
def test_prometheus_counters_and_gauges(logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    served = Served()
    first = served.add(4)
    second = served.add(4)
    served.mapping[second[3]] = served.mapping[first[3]]
    monitor = watch(served, logger, metrics=registry, name="m1")
    quiet = attach(SWATokenToKVPoolAllocator(64, 32, 1, torch.float16, "cpu"), metrics=registry, name="m2", every=1)
    for _ in range(3):
        monitor.step(**served.batch())
        quiet.step()
    value = registry.get_sample_value
    labels = {"monitor": "m1", "invariant": Name.SWA_LE_FULL, "severity": "FATAL"}
    assert value("swa_canary_violations_total", {**labels, "source": "divergence"}) == 1
    assert value("swa_canary_violations_total", {**labels, "source": "probe"}) == 1
    assert value("swa_canary_checks_total", {"monitor": "m1"}) == 3
    assert value("swa_canary_checks_total", {"monitor": "m2"}) == 3
    divergence = {"monitor": "m1", "invariant": Name.SWA_LE_FULL, "source": "divergence"}
    assert value("swa_canary_violating_items", divergence) == 2
    assert value("swa_canary_violating_items", {"monitor": "m2", "invariant": Name.SENTINEL, "source": "probe"}) == 0
    assert value("swa_canary_divergence_tokens", {"monitor": "m1", "kind": "shared"}) == 2
    assert value("swa_canary_enabled", {"monitor": "m1"}) == 1
    monkeypatch.setattr(sweep_module, "run_probes", lambda *a, **k: 1 / 0)
    monitor.step()
    assert value("swa_canary_enabled", {"monitor": "m1"}) == 0


def test_metrics_without_prometheus_client_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MetricsUnavailableError, match="swa-canary\\[metrics\\]"):
        attach(SWATokenToKVPoolAllocator(64, 32, 1, torch.float16, "cpu"), metrics=True)


# --------------------------------------------------------------- snapshots
def test_a_snapshot_of_the_checked_state_replays_the_violations(
    tmp_path, logger: logging.Logger, capsys: pytest.CaptureFixture
) -> None:
    served = Served(page_size=4, size_swa=64)
    served.add(8)
    tokens = served.add(12)
    served.mapping[tokens[-1]] = 0  # in the window: WINDOW; its SWA slot is now referenced by nobody
    served.rows[1] = 3  # the request lives in another req_to_token row
    served.req_to_token[3] = served.req_to_token[1]
    monitor = watch(served, logger, snapshot_dir=tmp_path / "snaps")
    monitor.step(**served.batch())
    records = monitor.recent()
    assert {(r.source, r.invariant, r.indices) for r in records} == {("divergence", Name.WINDOW, (3,))}
    paths = {r.snapshot for r in records}
    assert len(paths) == 1 and paths != {None}
    snapshot = Snapshot.load(paths.pop())
    assert snapshot.step == 1 and snapshot.window == WINDOW and snapshot.batch.req_to_token.shape == (2, 32)
    result = replay(snapshot)
    assert {(source, v.invariant, tuple(v.indices)) for source, v in result.sourced()} == {
        (r.source, r.invariant, r.indices) for r in records
    }
    assert main(["replay", records[0].snapshot]) == 1
    output = capsys.readouterr().out
    assert "[divergence] FATAL WINDOW: 1 in-window tokens have no SWA slot" in output


def test_replay_of_a_clean_snapshot_finds_nothing(tmp_path, capsys: pytest.CaptureFixture) -> None:
    served = Served()
    served.add(8)
    batch = Batch(**served.batch())
    view = AllocatorView.of(served.allocator)
    path = Snapshot.capture(view, batch, window=WINDOW, page_size=1, step=7, monitor="m").save(tmp_path / "s.pt")
    assert replay(Snapshot.load(path)).violations == []
    assert main(["replay", str(path)]) == 0
    assert "no violation" in capsys.readouterr().out


def test_replay_rejects_what_is_not_a_snapshot(tmp_path, capsys: pytest.CaptureFixture) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "something else"}, wrong)
    for path, message in (
        (garbage, "is not a canary snapshot"), (wrong, "keys"), (tmp_path / "missing.pt", "no snapshot file")
    ):
        with pytest.raises(SnapshotError, match=message):
            Snapshot.load(path)
        assert main(["replay", str(path)]) == 2
    assert main(["replay", str(tmp_path)]) == 2  # a directory is read as a fuzzing finding
    assert "is not a finding directory" in capsys.readouterr().err


# -------------------------------------------------------------------- CUDA
def simulator(every: int, steps: int = 200):
    from canary.simulate import SimulationConfig, Simulator

    config = SimulationConfig(
        steps=steps, page_size=16, size=1 << 16, size_swa=1 << 14, window=256, device="cuda", every=every,
        canary="strict", seed=5,
    )
    return Simulator(config)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("every", [1, 3])
def test_the_monitor_never_synchronises_on_cuda(every: int) -> None:
    sim = simulator(every)
    for _ in range(sim.config.steps):
        sim.advance()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sim.check()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    read_while_stepping = sim.monitor.stats().checks
    sim.monitor.flush()
    stats = sim.monitor.stats()
    assert stats.enabled and stats.records == 0
    assert read_while_stepping > 0
    assert stats.checks + stats.skipped == sim.config.steps // every
    assert stats.divergence["live"] > 0


@pytest.mark.cuda
@CUDA
def test_reports_arrive_a_step_later_without_a_flush(logger: logging.Logger) -> None:
    allocator = build(BUGS[Name.SENTINEL].allocator, BUGS[Name.SENTINEL], torch.device("cuda"))
    BUGS[Name.SENTINEL].scenario(allocator)
    monitor = attach(allocator, every=1, logger=logger)
    for _ in range(10_000):
        monitor.step()
        if monitor.recent():
            break
    (record,) = monitor.recent()
    assert record.invariant == Name.SENTINEL and record.checked_step <= record.reported_step


@pytest.mark.cuda
@CUDA
def test_a_captured_step_checks_on_every_graph_replay(logger: logging.Logger) -> None:
    served = Served(page_size=4, size_swa=64, device="cuda")
    served.add(8)
    tokens = served.add(12)
    batch = served.batch()
    monitor = watch(served, logger, mode="strict")  # strict: an error inside the capture surfaces
    for _ in range(3):  # warm-up: lazy initialisation must not happen inside the capture
        monitor.step(**batch)
    monitor.flush()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        monitor.step(**batch)
    captured_step = monitor.stats().steps
    graph.replay()
    monitor.flush()
    assert monitor.recent() == [] and monitor.enabled

    served.mapping[-1] = 0
    served.mapping[tokens[-1]] = 0
    graph.replay()
    with pytest.raises(InvariantViolation):
        monitor.flush()
    found = {(r.source, r.invariant): (r.indices, r.checked_step) for r in monitor.recent()}
    assert found[("probe", Name.SENTINEL)] == ((served.mapping.numel() - 1,), captured_step)
    assert found[("divergence", Name.WINDOW)] == ((1,), captured_step)
