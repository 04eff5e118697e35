"""Campaigns end to end: real worker processes, signals, a shared database, exported findings.

The broken target is the fixture KeepsMappingOnFreeSwa of properties/targets/mutants/fixtures.py
(free leaves the mapping pointing at released SWA slots): SlotMachine finds it within a second or two. Campaigns run
either as `swa-canary fuzz` subprocesses (signals, exit codes) or in this process with a
display that records every line. The Redis tests start their own redis-server on a free
loopback port and skip when it is not installed.
"""

from __future__ import annotations

import io
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from hypothesis.database import DirectoryBasedExampleDatabase, InMemoryExampleDatabase

from allocator import SWATokenToKVPoolAllocator
from canary.invariants import Name
from properties.campaign import CampaignConfig, run_campaign
from properties.campaign.database import DatabaseSpec, ResilientRedisDatabase
from properties.campaign.progress import ProgressDisplay
from properties.campaign.worker import (
    DATABASE,
    SEARCH,
    RunDatabase,
    reported_choices,
    run_machine,
    run_settings,
    settle_run,
)
from properties.machines import machine_classes
from properties.runners.check import Stats
from properties.runners.export import REPORT_NAME, exported_findings, load_report
from properties.targets import AllocatorConfig, resolve_target
from properties.targets.mutants import fixtures

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
BROKEN = "test_campaign:keeps_mapping_on_free"
FAST = ("SlotMachine",)
SEGFAULTS = "tests.isolation_targets:segfaults_on_second_alloc"


def keeps_mapping_on_free(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
    return fixtures.KeepsMappingOnFreeSwa(
        config.size, config.size_swa, config.page_size, config.dtype, config.device,
        need_sort=config.need_sort, checked=True,
    )


# ------------------------------------------------------------------ running campaigns
class Cli:
    """`swa-canary fuzz` in a subprocess; its JSON lines, read as they come."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "properties.cli", "fuzz", "--interval", "0.3", *args],
            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.records: list[dict] = []
        self.errors: list[str] = []
        threading.Thread(
            target=lambda: [self.lines.put(json.loads(line)) for line in self.process.stdout], daemon=True
        ).start()
        threading.Thread(target=lambda: self.errors.extend(self.process.stderr), daemon=True).start()

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                record = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.records.append(record)
            if predicate(record):
                return record
        self.process.kill()
        raise AssertionError(f"no such record within {timeout}s; stderr:\n{''.join(self.errors)[-3000:]}")

    def stop(self) -> tuple[dict, int]:
        """SIGINT; the summary and the exit code."""
        self.process.send_signal(signal.SIGINT)
        summary = self.wait_for(lambda record: record["event"] == "summary", timeout=30)
        return summary, self.process.wait(timeout=30)


class Recorder(ProgressDisplay):
    """Keeps every record; sends this process SIGINT (the campaign's own stop) on the first
    record `stop_on` accepts."""

    def __init__(self, stop_on: Callable[[dict], bool] = lambda record: False) -> None:
        self.text = io.StringIO()
        super().__init__(interval=0.5, stream=self.text, tty=False)
        self.stop_on = stop_on
        self.stopped = False

    def event(self, record: dict) -> None:
        super().event(record)
        if not self.stopped and self.stop_on(record):
            self.stopped = True
            os.kill(os.getpid(), signal.SIGINT)

    @property
    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.text.getvalue().splitlines()]

    def events(self, kind: str) -> list[dict]:
        return [record for record in self.records if record["event"] == kind]


def is_finding(record: dict) -> bool:
    return record["event"] == "finding"


def campaign(out: Path, target: str = BROKEN, stop_on=is_finding, **options) -> tuple[dict, Recorder]:
    recorder = Recorder(stop_on)
    config = CampaignConfig(target=target, duration=options.pop("duration", 60.0), workers=1, out=out, machines=FAST,
                            status_seconds=0.5, **options)
    return run_campaign(config, recorder), recorder


@dataclass
class BrokenRun:
    out: Path
    finding: dict
    summary: dict
    returncode: int
    stop_seconds: float


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory: pytest.TempPathFactory) -> BrokenRun:
    """One CLI campaign against the broken target, stopped with SIGINT after its first finding."""
    out = tmp_path_factory.mktemp("broken") / "out"
    cli = Cli("--target", BROKEN, "--workers", "1", "--machine", "SlotMachine", "--out", str(out))
    finding = cli.wait_for(is_finding)
    sent = time.monotonic()
    summary, returncode = cli.stop()
    return BrokenRun(out, finding, summary, returncode, time.monotonic() - sent)


# ------------------------------------------------------------------ the tests
def test_sigint_ends_with_a_summary_and_an_intact_database(broken_run: BrokenRun) -> None:
    summary = broken_run.summary
    assert summary["stopped_by"] == "SIGINT" and broken_run.returncode == 1
    assert broken_run.stop_seconds < 15
    assert broken_run.finding["id"] in summary["new_findings"] and summary["steps"] > 0
    assert summary["calls"]["alloc"] > 0 and summary["examples"] > 0
    findings = broken_run.out / "findings"
    assert [path.name for path in findings.iterdir()] == [path.name for path in exported_findings(findings)]
    examples = [path for path in (broken_run.out / "examples").rglob("*") if path.is_file()]
    assert examples and all(path.stat().st_size > 0 for path in examples)


def test_the_exported_finding_fails_on_the_broken_allocator_and_passes_on_the_reference(broken_run: BrokenRun) -> None:
    directory = Path(broken_run.finding["path"])
    report = load_report(directory)
    assert report["kind"] == "violation" and report["target"] == f"{BROKEN}@" and report["machine"] == "SlotMachine"
    assert report["calls"]["calls"] and report["program"].startswith("state = SlotMachine()")
    # `replay` runs the file with pytest on the finding's own target; then pytest itself, on the reference.
    on_broken = subprocess.run([sys.executable, "-m", "properties.cli", "replay", str(directory)], env=ENV,
                               capture_output=True, text=True)
    assert on_broken.returncode == 1 and "1 failed" in on_broken.stdout, on_broken.stdout[-2000:]
    pytest_file = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(directory), report["test"]
    ]
    on_reference = subprocess.run(
        pytest_file, cwd=directory, env={**ENV, "SWA_TARGET": "reference"}, capture_output=True, text=True
    )
    assert on_reference.returncode == 0 and "1 passed" in on_reference.stdout, on_reference.stdout[-2000:]


def test_a_resumed_campaign_replays_known_failures(broken_run: BrokenRun, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(broken_run.out, out)
    known = broken_run.finding["id"]
    summary, recorder = campaign(out, stop_on=lambda record: is_finding(record) and record["id"] == known)
    (resume,) = recorder.events("resume")
    assert known in resume["still_failing"] and resume["fixed"] == []
    # The broken allocator breaks more than one invariant, so the stored examples may replay other
    # findings too; the known one must come back from the database, not as a new discovery.
    replayed = [event for event in recorder.events("finding") if event["id"] == known]
    assert replayed and (replayed[0]["via"], replayed[0]["new"]) == ("database", False)
    assert known in summary["still_failing"]

    summary, recorder = campaign(out, target="reference", duration=0.0)
    assert known in recorder.events("resume")[0]["fixed"] and summary["still_failing"] == []


def test_a_worker_killed_mid_run_is_replaced(tmp_path: Path) -> None:
    cli = Cli("--target", "reference", "--workers", "1", "--machine", "SlotMachine", "--out", str(tmp_path))
    running = cli.wait_for(lambda record: record["event"] == "status" and record["steps"] > 0 and record["pids"])
    (victim,) = running["pids"]
    os.kill(victim, signal.SIGKILL)
    crash = cli.wait_for(lambda record: record["event"] == "crash")
    assert (crash["pid"], crash["status"], crash["machine"]) == (victim, "SIGKILL", "SlotMachine")
    replaced = cli.wait_for(
        lambda record: record["event"] == "status" and record["workers"] == 1 and record["restarts"] == 1
    )
    assert victim not in replaced["pids"]
    cli.wait_for(lambda record: record["event"] == "status" and record["steps"] > replaced["steps"])
    summary, returncode = cli.stop()
    assert (summary["crashes"], summary["restarts"], returncode) == (1, 1, 1)
    report = json.loads((Path(crash["path"]) / REPORT_NAME).read_text())
    assert (report["kind"], report["seed"], report["exitcode"]) == ("crash", crash["seed"], -signal.SIGKILL)


def test_a_segfaulting_target_is_a_crash_finding_and_the_worker_lives_on(tmp_path: Path) -> None:
    """fuzz isolates the target by default: the segfault kills the target's process, not the
    worker, which reports a shrunk CRASH finding and goes on to find it again."""
    findings: list[dict] = []

    def found_twice(record: dict) -> bool:
        findings.extend([record] if is_finding(record) else [])
        return len(findings) == 2

    summary, recorder = campaign(tmp_path, target=SEGFAULTS, stop_on=found_twice)
    finding = recorder.events("finding")[0]
    assert (finding["invariant"], finding["kind"]) == (Name.CRASH, "error"), finding
    report = load_report(Path(finding["path"]))
    assert "SIGSEGV" in report["detail"] and [call["call"] for call in report["calls"]["calls"]] == ["alloc", "alloc"]
    assert (summary["crashes"], summary["restarts"], summary["target"]) == (0, 0, f"{SEGFAULTS}@")
    pids = {tuple(record["pids"]) for record in recorder.events("status") if record["pids"]}
    assert len(pids) == 1, pids  # one worker process from start to end


# ------------------------------------------------------------------ Redis
class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.executable = shutil.which("redis-server")
        if self.executable is None:
            pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
        self.redis = pytest.importorskip("redis", reason="the redis extra is not installed (pip install '.[redis]')")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )
        client = self.redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except self.redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def fetch(self, key: bytes) -> set[bytes]:
        from hypothesis.extra.redis import RedisExampleDatabase

        return set(RedisExampleDatabase(self.redis.Redis(port=self.port)).fetch(key))


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_redis_outage_loses_nothing(redis_server: RedisServer, tmp_path: Path) -> None:
    logs: list[str] = []
    local = DirectoryBasedExampleDatabase(tmp_path / "local")
    database = ResilientRedisDatabase(local, redis_server.url, retry_seconds=0.0, log=logs.append)
    database.save(b"k", b"before")
    assert redis_server.fetch(b"k") == {b"before"}

    redis_server.stop()
    database.save(b"k", b"during")
    database.delete(b"k", b"before")
    database.save(b"other", b"during")
    assert set(database.fetch(b"k")) == {b"during"} and len(logs) == 1 and "failed" in logs[0]

    redis_server.start()
    database.save(b"later", b"after")
    assert len(logs) == 2 and "back" in logs[1]
    assert [redis_server.fetch(key) for key in (b"k", b"other", b"later")] == [{b"during"}, {b"during"}, {b"after"}]
    assert set(local.fetch(b"later")) == {b"after"}


def test_redis_restarted_empty_gets_every_local_example_back(redis_server: RedisServer, tmp_path: Path) -> None:
    logs: list[str] = []
    local = DirectoryBasedExampleDatabase(tmp_path / "local")
    database = ResilientRedisDatabase(local, redis_server.url, retry_seconds=0.0, log=logs.append)
    keys = [f"key-{index}".encode() for index in range(20)]
    for key in keys:
        database.save(key, b"value of " + key)
    assert database.health() == {"redis": "up", "down_s": 0.0, "outages": 0}

    redis_server.stop()  # its data is not persisted: it comes back empty
    database.save(b"during", b"outage")
    assert database.health()["redis"] == "down"
    redis_server.start()
    database.save(b"after", b"outage")
    assert [redis_server.fetch(key) for key in keys] == [{b"value of " + key} for key in keys]
    assert (redis_server.fetch(b"during"), redis_server.fetch(b"after")) == ({b"outage"}, {b"outage"})
    assert database.health() == {"redis": "up", "down_s": 0.0, "outages": 1}
    assert "re-synced 22 examples of 22 keys" in logs[-1]


class HealthRecorder(Recorder):
    """Stops the campaign at the first status line that shows Redis's health."""

    def status(self, status: dict, force: bool = False) -> None:
        super().status(status, force=True)
        if not self.stopped and status["database"].get("redis"):
            self.stopped = True
            os.kill(os.getpid(), signal.SIGINT)


def test_campaign_status_lines_show_the_database_health(redis_server: RedisServer, tmp_path: Path) -> None:
    recorder = HealthRecorder()
    config = CampaignConfig(target="reference", duration=60.0, workers=1, out=tmp_path / "out", machines=FAST,
                            database=DatabaseSpec.parse(redis_server.url, tmp_path / "out"))
    summary = run_campaign(config, recorder)
    assert summary["stopped_by"] == "SIGINT"
    health = [status["database"] for status in recorder.events("status")]
    assert all(entry["spec"].startswith(redis_server.url) for entry in health)
    assert health[0].get("redis") is None  # no worker has reported yet
    reported = [entry for entry in health if entry.get("redis")]
    assert reported and {"redis": "up", "workers_down": 0, "outages": 0}.items() <= reported[0].items()


def test_two_campaigns_sharing_redis_see_each_others_findings(redis_server: RedisServer, tmp_path: Path) -> None:
    shared = DatabaseSpec.parse(redis_server.url, tmp_path / "first")
    _, first = campaign(tmp_path / "first", database=shared)
    found = first.events("finding")[0]
    assert found["via"] == "search"

    _, second = campaign(tmp_path / "second", database=DatabaseSpec.parse(redis_server.url, tmp_path / "second"))
    seen = second.events("finding")[0]
    # The first campaign may report more than one finding before it stops: the second reports
    # one of them (the smallest), never a failure the first left unreported.
    assert seen["id"] in {finding["id"] for finding in first.events("finding")}
    assert (seen["via"], seen["new"]) == ("database", True)
    assert (tmp_path / "second" / "findings" / seen["id"] / REPORT_NAME).is_file()


def primary_values(database: InMemoryExampleDatabase) -> list[bytes]:
    return [value for key, values in database.data.items() if not key.endswith((b".secondary", b".pareto"))
            for value in values]


def test_a_run_leaves_only_the_failure_it_reported_under_the_primary_key() -> None:
    """Shrinking, Hypothesis slips to smaller bugs and leaves the last failure of each behind
    under the primary key, which the next database pass replays first and reports unshrunk."""
    database = InMemoryExampleDatabase()
    machine = machine_classes(resolve_target(BROKEN), "cpu")["SlotMachine"]
    run_database = RunDatabase(database)
    error = run_machine(machine, Stats(), 0, run_settings(run_database, 100, SEARCH))
    assert error is not None and len(primary_values(database)) > 1
    settle_run(run_database, True, error)
    assert primary_values(database) == [reported_choices(error)]
    again = run_machine(machine, Stats(), 1, run_settings(RunDatabase(database), 100, DATABASE))
    assert again is not None and reported_choices(again) == reported_choices(error)


def test_an_interrupted_run_leaves_its_failures_for_the_next_database_pass_to_shrink() -> None:
    database = InMemoryExampleDatabase()
    machine = machine_classes(resolve_target(BROKEN), "cpu")["SlotMachine"]
    run_database = RunDatabase(database)
    assert run_machine(machine, Stats(), 0, run_settings(run_database, 100, SEARCH)) is not None
    settle_run(run_database, False, None)
    assert primary_values(database) == []
    run_database = RunDatabase(database)
    found = run_machine(machine, Stats(), 1, run_settings(run_database, 100, DATABASE))
    assert found is not None
    settle_run(run_database, True, found)
    assert primary_values(database) == [reported_choices(found)]


def test_on_a_terminal_progress_is_one_line_redrawn_in_place() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(interval=10.0, stream=stream, tty=True)
    status = {"elapsed": 3.0, "duration": 60.0, "workers": 2, "examples": 40, "steps": 1234, "steps_per_s": 411.0,
              "calls": {"alloc": 9, "free": 3}, "events": {"window slide freed SWA slots": 2},
              "findings": 0, "crashes": 0}
    display.status(status)
    display.event({"event": "finding", "new": True, "severity": "FATAL", "invariant": Name.STALE,
                   "machine": "SlotMachine", "seed": 5, "via": "search", "path": "out/findings/stale-1"})
    display.status({**status, "steps": 2000, "findings": 1}, force=True)
    display.close()
    lines = stream.getvalue().split("\n")
    assert len(lines) == 3 and lines[-1] == "" and "{" not in stream.getvalue()
    assert lines[0].endswith("FATAL STALE in SlotMachine (seed 5, via search): out/findings/stale-1")
    shown = lines[1].split("\r\x1b[K")[-1]
    assert shown.startswith("[      3s / 60s] 2 workers") and "2,000 steps" in shown and "1 findings" in shown
    assert "2 calls, 1 events covered" in shown
