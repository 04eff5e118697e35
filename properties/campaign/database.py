"""The example database a campaign's workers share.

`--db PATH` is a directory database (one file per example, so processes share it safely).
`--db redis://HOST:PORT/N` is Redis layered over the campaign's local directory: every
example is written locally first, then to Redis; reads merge both. While Redis is
unreachable the campaign keeps running on the local directory (one log line per outage), and
when Redis answers again every key this process has used is pushed back with everything the
local copy holds for it (Redis may have come back empty, after a restart), so an outage loses
nothing. `health` says how the database is doing, for the campaign's status lines.

Every key is scoped by target and device: a replayed example that no longer fails is
deleted by Hypothesis, so campaigns against a fixed allocator must not see, and delete, the
failures of a broken one.
"""

from __future__ import annotations

import hashlib
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
RETRY_SECONDS = 5.0
_T = TypeVar("_T")


def is_redis_url(spec: str) -> bool:
    return spec.startswith(REDIS_SCHEMES)


class CampaignDatabaseError(ValueError):
    """A --db that cannot work (e.g. a Redis URL without the `redis` extra installed)."""


def log_to_stderr(message: str) -> None:
    sys.stderr.write(f"swa-canary: {message}\n")
    sys.stderr.flush()


class ResilientRedisDatabase(ExampleDatabase):
    """A local database with Redis on top; Redis errors never reach Hypothesis."""

    def __init__(
        self,
        local: ExampleDatabase,
        url: str,
        retry_seconds: float = RETRY_SECONDS,
        log: Callable[[str], None] = log_to_stderr,
    ) -> None:
        super().__init__()
        try:
            import redis
            from hypothesis.extra.redis import RedisExampleDatabase
        except ImportError as error:
            raise CampaignDatabaseError(
                f"--db {url} needs the redis extra (pip install 'swa-canary[redis]'): {error}"
            ) from None
        self.local = local
        self.url = url
        self.retry_seconds = retry_seconds
        self.log = log
        self._errors = (redis.RedisError, OSError)
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.remote = RedisExampleDatabase(client)
        self.down_since: float | None = None
        self._last_try = 0.0
        self.known: set[bytes] = set()
        """Every key this process saved, fetched or moved: on re-sync, all their local values go up."""
        self.deleted: set[tuple[bytes, bytes]] = set()
        """Deletions Redis missed."""
        self.outages = 0

    def __repr__(self) -> str:
        return f"ResilientRedisDatabase({self.local!r}, {self.url!r})"

    @property
    def connected(self) -> bool:
        return self.down_since is None

    def _remote(self, action: Callable[[], _T]) -> tuple[bool, _T | None]:
        """(True, result) if Redis did it; (False, None) if Redis is down."""
        if self.down_since is not None and not self._reconnect(self.down_since):
            return False, None
        try:
            return True, action()
        except self._errors as error:
            self.down_since = self._last_try = time.monotonic()
            self.outages += 1
            self.log(f"example database: Redis at {self.url} failed ({error}); keeping examples in {self.local!r}")
            return False, None

    def _reconnect(self, down_since: float) -> bool:
        now = time.monotonic()
        if now - self._last_try < self.retry_seconds:
            return False
        self._last_try = now
        try:
            self.remote.redis.ping()
            for key, value in sorted(self.deleted):
                self.remote.delete(key, value)
            values = 0
            for key in sorted(self.known):
                for value in self.local.fetch(key):
                    self.remote.save(key, value)
                    values += 1
        except self._errors:
            return False
        self.log(
            f"example database: Redis at {self.url} is back after {now - down_since:.0f}s; "
            f"re-synced {values} examples of {len(self.known)} keys"
        )
        self.down_since = None
        self.deleted.clear()
        return True

    def health(self) -> dict:
        """{"redis": "up" or "down", "down_s": seconds down, "outages": count}."""
        down = 0.0 if self.down_since is None else round(time.monotonic() - self.down_since, 1)
        return {"redis": "up" if self.connected else "down", "down_s": down, "outages": self.outages}

    def save(self, key: bytes, value: bytes) -> None:
        self.known.add(key)
        self.local.save(key, value)
        self._remote(lambda: self.remote.save(key, value))

    def fetch(self, key: bytes) -> Iterable[bytes]:
        self.known.add(key)
        seen = set()
        for value in self.local.fetch(key):
            seen.add(value)
            yield value
        _, remote_values = self._remote(lambda: list(self.remote.fetch(key)))
        for value in remote_values or ():
            if value not in seen:
                seen.add(value)
                yield value

    def delete(self, key: bytes, value: bytes) -> None:
        self.local.delete(key, value)
        if not self._remote(lambda: self.remote.delete(key, value))[0]:
            self.deleted.add((key, value))

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.known.update((src, dest))
        self.local.move(src, dest, value)
        if not self._remote(lambda: self.remote.move(src, dest, value))[0]:
            self.deleted.add((src, value))


class ScopedDatabase(ExampleDatabase):
    """Another database with every key prefixed by a scope."""

    def __init__(self, inner: ExampleDatabase, scope: bytes) -> None:
        super().__init__()
        self.inner = inner
        self.scope = scope

    def __repr__(self) -> str:
        return f"ScopedDatabase({self.inner!r}, {self.scope!r})"

    def _key(self, key: bytes) -> bytes:
        return self.scope + b":" + key

    def save(self, key: bytes, value: bytes) -> None:
        self.inner.save(self._key(key), value)

    def fetch(self, key: bytes) -> Iterable[bytes]:
        return self.inner.fetch(self._key(key))

    def delete(self, key: bytes, value: bytes) -> None:
        self.inner.delete(self._key(key), value)

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.inner.move(self._key(src), self._key(dest), value)


@dataclass(frozen=True)
class DatabaseSpec:
    """Where a campaign keeps examples: a local directory, with Redis over it if `redis_url`."""

    local: str
    redis_url: str | None = None

    @classmethod
    def parse(cls, db: str | None, out: Path) -> "DatabaseSpec":
        """--db as given (None: out/examples); a Redis URL keeps out/examples as its local layer."""
        if db is None:
            return cls(str(out / "examples"))
        if is_redis_url(db):
            check_redis_url(db)
            return cls(str(out / "examples"), db)
        if "://" in db:
            raise CampaignDatabaseError(
                f"--db {db}: not a Redis URL ({', '.join(REDIS_SCHEMES)}...) nor a directory path"
            )
        return cls(db)

    def describe(self) -> str:
        return self.local if self.redis_url is None else f"{self.redis_url} over {self.local}"

    def open(self, target: str, device: str, log: Callable[[str], None] = log_to_stderr) -> ExampleDatabase:
        local: ExampleDatabase = DirectoryBasedExampleDatabase(self.local)
        if self.redis_url is not None:
            local = ResilientRedisDatabase(local, self.redis_url, log=log)
        return ScopedDatabase(local, target_scope(target, device))


def check_redis_url(url: str) -> None:
    """CampaignDatabaseError for a Redis URL that cannot name a server and database: a port
    that is no number (or out of range), a database that is not a number, no host.

    Args:
        url: a redis://, rediss:// or unix:// URL.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        _ = parts.port  # urllib checks the port as it reads it
    except ValueError as error:
        raise CampaignDatabaseError(f"--db {url}: {error}") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise CampaignDatabaseError(f"--db {url}: a unix:// URL needs a socket path")
        return
    if not parts.hostname:
        raise CampaignDatabaseError(f"--db {url}: no host (redis://HOST:PORT/N)")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise CampaignDatabaseError(f"--db {url}: the database {database!r} is not a number (redis://HOST:PORT/N)")


def health(database: ExampleDatabase) -> dict:
    """How a campaign's database is doing: {"redis": "up" | "down", "down_s", "outages"} over
    Redis, {} for a directory alone.

    Args:
        database: what `DatabaseSpec.open` returned.
    """
    inner = database.inner if isinstance(database, ScopedDatabase) else database
    return inner.health() if isinstance(inner, ResilientRedisDatabase) else {}


def target_scope(target: str, device: str) -> bytes:
    return hashlib.sha256(f"{target}@{device}".encode()).hexdigest()[:16].encode()


def check_redis_available(spec: DatabaseSpec) -> None:
    """Raise CampaignDatabaseError before any worker starts if the spec needs a missing extra."""
    if spec.redis_url is not None:
        ResilientRedisDatabase(DirectoryBasedExampleDatabase(spec.local), spec.redis_url, log=lambda _: None)
