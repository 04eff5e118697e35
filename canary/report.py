"""How the canary reports: one-line JSON log records with a fixed prefix (and their parser),
counters (optionally Prometheus), and a bounded ring of recent records.

A record line is `SWA_CANARY {json}`; the JSON object holds `schema` and every field of
`CanaryRecord`. `parse_record` finds the prefix anywhere in a line, so it reads lines that a
logging formatter has prefixed with a time and a level, and raises `RecordFormatError` on
anything that is not exactly one record.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections import Counter, deque
from dataclasses import asdict, dataclass, fields
from typing import Any

from allocator.errors import IntegerError
from allocator.validation import check_int
from canary.invariants import INVARIANTS, Name, Severity, Violation

RECORD_PREFIX = "SWA_CANARY "
DISABLED_PREFIX = "SWA_CANARY_DISABLED "
RECORD_SCHEMA = 1
SOURCES = ("probe", "divergence")

_LOG_LEVELS = {Severity.FATAL.value: logging.ERROR, Severity.GUARD.value: logging.WARNING}


class RecordFormatError(ValueError):
    """A line that is not a well-formed canary record."""


class RecordIntegerError(IntegerError, RecordFormatError):
    """An index in a violation record is not an int."""


@dataclass(frozen=True)
class CanaryRecord:
    """One violation, reported once."""

    invariant: str
    severity: str
    source: str
    """"probe" (allocator state) or "divergence" (the live batch)."""
    count: int
    indices: tuple[int, ...]
    """The first offending items: tokens, slots or units for probes, req_to_token rows for the detector."""
    detail: str
    checked_step: int
    """The step whose state was checked."""
    reported_step: int
    """The step at which the check was read back and reported."""
    monitor: str
    snapshot: str | None
    """The snapshot file of the checked state, when the monitor writes them."""
    time: float
    """Unix time of the report."""

    @classmethod
    def of(
        cls,
        violation: Violation,
        source: str,
        *,
        checked_step: int,
        reported_step: int,
        monitor: str,
        snapshot: str | None = None,
    ) -> "CanaryRecord":
        return cls(
            invariant=violation.invariant,
            severity=violation.severity.value,
            source=source,
            count=violation.count,
            indices=tuple(violation.indices),
            detail=violation.detail,
            checked_step=checked_step,
            reported_step=reported_step,
            monitor=monitor,
            snapshot=snapshot,
            time=time.time(),
        )

    def violation(self) -> Violation:
        return Violation(Name(self.invariant), Severity(self.severity), self.count, list(self.indices), self.detail)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "invariant": (str,),
    "severity": (str,),
    "source": (str,),
    "count": (int,),
    "indices": (list,),
    "detail": (str,),
    "checked_step": (int,),
    "reported_step": (int,),
    "monitor": (str,),
    "snapshot": (str, type(None)),
    "time": (float, int),
}
assert set(_FIELD_TYPES) == {field.name for field in fields(CanaryRecord)}


def format_record(record: CanaryRecord) -> str:
    """The record as one log line: the prefix, then compact JSON (no newline inside)."""
    body = {"schema": RECORD_SCHEMA, **asdict(record), "indices": list(record.indices)}
    return RECORD_PREFIX + json.dumps(body, separators=(",", ":"))


def parse_record(line: str) -> CanaryRecord:
    """The record in `line` (the prefix may follow a log formatter's own prefix)."""
    if not isinstance(line, str):
        raise RecordFormatError(f"a record line is a str, got {type(line).__name__}")
    start = line.find(RECORD_PREFIX)
    if start < 0:
        raise RecordFormatError(f"no {RECORD_PREFIX.strip()!r} record in line: {line[:80]!r}")
    text = line[start + len(RECORD_PREFIX) :].strip()
    try:
        body, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as error:
        raise RecordFormatError(f"record is not JSON: {error}") from None
    if text[end:].strip():
        raise RecordFormatError(f"text after the record: {text[end:][:40]!r}")
    if not isinstance(body, dict):
        raise RecordFormatError(f"record is a JSON {type(body).__name__}, not an object")
    if body.pop("schema", None) != RECORD_SCHEMA:
        raise RecordFormatError(f"record schema is not {RECORD_SCHEMA}")
    if set(body) != set(_FIELD_TYPES):
        missing, extra = set(_FIELD_TYPES) - set(body), set(body) - set(_FIELD_TYPES)
        raise RecordFormatError(f"record fields differ: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for name, types in _FIELD_TYPES.items():
        if isinstance(body[name], bool) or not isinstance(body[name], types):
            raise RecordFormatError(f"record field {name!r} has the wrong type: {body[name]!r}")
    for index in body["indices"]:
        check_int("a record index", index, error=RecordIntegerError)
    invariant = INVARIANTS.get(body["invariant"])
    if invariant is None:
        raise RecordFormatError(f"record names unknown invariant {body['invariant']!r}")
    if body["severity"] != invariant.severity.value:
        raise RecordFormatError(f"{invariant.name} is {invariant.severity.value}, the record says {body['severity']!r}")
    if body["source"] not in SOURCES:
        raise RecordFormatError(f"record source {body['source']!r} is not one of {SOURCES}")
    if body["count"] < 1:
        raise RecordFormatError(f"record count {body['count']} is not positive")
    body["indices"] = tuple(body["indices"])
    body["time"] = float(body["time"])
    return CanaryRecord(**body)


# ------------------------------------------------------------------ reporting
class MetricsUnavailableError(ImportError):
    """Prometheus metrics were asked for but prometheus_client is not installed."""


class MetricsConfigError(ValueError):
    """`metrics` is neither True nor a prometheus_client CollectorRegistry."""


class Reporter:
    """Logs, counts and keeps the records of one monitor; mirrors the counts to Prometheus
    when given a registry (`metrics=True` for prometheus_client's default one)."""

    def __init__(self, monitor: str, logger: logging.Logger, ring_size: int, metrics: Any = None) -> None:
        self.monitor = monitor
        self.logger = logger
        self.ring: deque[CanaryRecord] = deque(maxlen=ring_size)
        self.by_invariant: Counter[tuple[str, str]] = Counter()
        """Records reported, per (invariant, severity)."""
        self.checks = 0
        self.skipped = 0
        self.divergence: dict[str, int] | None = None
        """The detector's totals of the latest check that ran it."""
        self._prometheus = None if metrics is None or metrics is False else _PrometheusMetrics.of(metrics)
        if self._prometheus is not None:
            self._prometheus.enabled.labels(monitor).set(1)

    def publish(self, record: CanaryRecord) -> None:
        self.logger.log(_LOG_LEVELS[record.severity], "%s", format_record(record))
        self.ring.append(record)
        self.by_invariant[record.invariant, record.severity] += 1
        if self._prometheus is not None:
            self._prometheus.violations.labels(self.monitor, record.invariant, record.severity, record.source).inc()

    def checked(self, current: dict[tuple[str, Name], int], divergence: dict[str, int] | None) -> None:
        """One check was read back: `current` holds each checked (source, invariant)'s count,
        0 for a quiet one."""
        self.checks += 1
        if divergence is not None:
            self.divergence = divergence
        if self._prometheus is None:
            return
        self._prometheus.checks.labels(self.monitor).inc()
        for (source, invariant), count in current.items():
            self._prometheus.violating.labels(self.monitor, invariant, source).set(count)
        for kind, count in (divergence or {}).items():
            self._prometheus.divergence.labels(self.monitor, kind).set(count)

    def skip(self) -> None:
        """A check came due while both read-back buffers were still in flight."""
        self.skipped += 1
        if self._prometheus is not None:
            self._prometheus.skipped.labels(self.monitor).inc()

    def disabled(self, error: BaseException) -> None:
        """The single line that says the monitor turned itself off."""
        reason = f"{type(error).__name__}: {error}".replace("\n", " | ")
        self.logger.error("%smonitor %s disabled after an internal error: %s", DISABLED_PREFIX, self.monitor, reason)
        if self._prometheus is not None:
            self._prometheus.enabled.labels(self.monitor).set(0)


class _PrometheusMetrics:
    """The canary's metric families in one registry, created once per registry (label
    `monitor` tells monitors apart), so that several monitors can share it."""

    _by_registry: "weakref.WeakKeyDictionary[Any, _PrometheusMetrics]" = weakref.WeakKeyDictionary()

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Gauge

        def counter(name: str, help_text: str, *labels: str) -> PromCounter:
            return PromCounter(name, help_text, ["monitor", *labels], registry=registry)

        def gauge(name: str, help_text: str, *labels: str) -> Gauge:
            return Gauge(name, help_text, ["monitor", *labels], registry=registry)

        self.checks = counter("swa_canary_checks", "Checks read back")
        self.skipped = counter("swa_canary_checks_skipped", "Checks skipped: both read-back buffers in flight")
        self.violations = counter(
            "swa_canary_violations", "Violations reported (each once)", "invariant", "severity", "source"
        )
        self.violating = gauge(
            "swa_canary_violating_items", "Offending items found by the latest check", "invariant", "source"
        )
        self.divergence = gauge(
            "swa_canary_divergence_tokens", "Divergence detector totals of the latest check", "kind"
        )
        self.enabled = gauge("swa_canary_enabled", "1 while the monitor runs, 0 once it has disabled itself")

    @classmethod
    def of(cls, metrics: Any) -> "_PrometheusMetrics":
        try:
            import prometheus_client
        except ImportError as error:
            raise MetricsUnavailableError(
                "Prometheus metrics need prometheus_client: pip install 'swa-canary[metrics]'"
            ) from error
        registry = prometheus_client.REGISTRY if metrics is True else metrics
        if not isinstance(registry, prometheus_client.CollectorRegistry):
            raise MetricsConfigError(f"metrics must be True or a prometheus_client CollectorRegistry, got {metrics!r}")
        if registry not in cls._by_registry:
            cls._by_registry[registry] = cls(registry)
        return cls._by_registry[registry]
