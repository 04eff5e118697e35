"""What a campaign shows while it runs.

On a terminal: one status line redrawn in place, with findings and other events printed
above it. Otherwise (a log file, CI, a pipe): one JSON object per line, a `status` record
every interval and one record per event, so a supervisor can follow the campaign.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

TTY_REFRESH_SECONDS = 0.5


def status_line(status: dict) -> str:
    return (
        f"[{status['elapsed']:7.0f}s / {status['duration']:.0f}s] {status['workers']} workers | "
        f"{status['examples']:,} examples, {status['steps']:,} steps ({status['steps_per_s']:,.0f}/s) | "
        f"{len(status['calls'])} calls, {len(status['events'])} events covered | "
        f"{status['findings']} findings, {status['crashes']} crashes"
    )


def event_line(record: dict) -> str:
    kind = record["event"]
    if kind == "finding":
        again = "" if record["new"] else " (seen before)"
        return (
            f"{record['severity']} {record['invariant']} in {record['machine']} (seed {record['seed']}, "
            f"via {record['via']}){again}: {record['path']}"
        )
    if kind == "crash":
        return (
            f"worker {record['worker']} died ({record['status']}) "
            f"in {record['machine']} seed {record['seed']}: {record['path']}"
        )
    if kind == "resume":
        return (
            f"resumed with {record['known']} exported findings: {len(record['still_failing'])} still fail, "
            f"{len(record['fixed'])} pass now"
        )
    if kind == "summary":
        return (
            f"stopped ({record['stopped_by']}) after {record['elapsed']:.0f}s: {record['examples']:,} examples, "
            f"{record['steps']:,} steps ({record['steps_per_s']:,.0f}/s), {len(record['new_findings'])} new findings, "
            f"{len(record['still_failing'])} known still failing, {record['crashes']} crashes, "
            f"{record['restarts']} restarts; findings in {record['findings_dir']}"
        )
    return " ".join(f"{key}={value}" for key, value in record.items())


class ProgressDisplay:
    def __init__(self, interval: float, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.last_status = float("-inf")
        self.line = ""

    def status(self, status: dict, force: bool = False) -> None:
        """Show the status if its interval has passed (or `force`)."""
        now = time.monotonic()
        if not force and now - self.last_status < (TTY_REFRESH_SECONDS if self.tty else self.interval):
            return
        self.last_status = now
        if self.tty:
            self.line = status_line(status)
            self._write(f"\r\x1b[K{self.line}")
        else:
            self._write(json.dumps({"event": "status", **status}) + "\n")

    def event(self, record: dict) -> None:
        if self.tty:
            self._write(f"\r\x1b[K{event_line(record)}\n{self.line}")
        else:
            self._write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.tty and self.line:
            self._write("\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
