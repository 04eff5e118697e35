"""Checks of command-line options, made before any run starts.

Each check raises `UsageError` (or, as an argparse `type=`, `argparse.ArgumentTypeError`), which
the command line reports as one line with exit status 2. Nothing here imports torch, so that
`swa-canary --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


class UsageError(ValueError):
    """An option, path or input file the command cannot work with (exit status 2)."""


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '15m' or '8h': a finite number above zero.

    Args:
        text: the option's value.
    Returns:
        The duration in seconds.
    """
    scale = DURATION_UNITS.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in DURATION_UNITS else text
    try:
        seconds = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90, 90s, 15m, 8h)") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be a finite number of seconds above 0, got {text!r}")
    return seconds


def _integer(text: str) -> int:
    """The option's value as an int, or the one message for a value that is not one."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    """An integer option that must be at least 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed(text: str) -> int:
    """A seed: an integer in [0, 2**32), as Hypothesis and `random` take it."""
    value = _integer(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**32), got {value}")
    return value


class LazyChoices(Sequence[str]):
    """The sorted keys of a registry named `module:attribute` (a dict or a tuple), imported only
    to check a given value, so that building the parser imports no torch. Until the registry is
    imported, the names listed (in a subcommand's help) are `listed`, its torch-free copy in
    `properties.names`; afterwards they are the registry's own."""

    def __init__(self, source: str, listed: tuple[str, ...], extra: tuple[str, ...] = ()) -> None:
        self.source, self.listed, self.extra = source, listed, extra

    def names(self, load: bool = True) -> list[str]:
        """Read afresh each time (the registry may change, as tests add to it); the import is
        cached. With load=False, the torch-free copy while the registry's module is not imported."""
        module, _, attribute = self.source.partition(":")
        if not load and module not in sys.modules:
            return [*self.listed, *self.extra]
        return [*sorted(getattr(importlib.import_module(module), attribute)), *self.extra]

    def __getitem__(self, index: Any) -> Any:
        return self.names(load=False)[index]

    def __len__(self) -> int:
        return len(self.names(load=False))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names(load=False))

    def __contains__(self, value: object) -> bool:
        return value in self.names()


def _probe_writable(directory: Path, what: str) -> None:
    """Create and remove a scratch file in `directory`: the only sure test of writability."""
    try:
        descriptor, scratch = tempfile.mkstemp(prefix=".swa-canary-probe-", dir=directory)
    except OSError as error:
        raise UsageError(f"{what}: cannot write in {str(directory)!r} ({error.strerror or error})") from None
    os.close(descriptor)
    os.unlink(scratch)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_file(path: str, option: str) -> Path:
    """A file the command will write at its end: its directory exists and is writable, and
    it is not a directory. Writes nothing.

    Args:
        path: the option's value.
        option: the option's name, for the message.
    Returns:
        The path.
    """
    if not path:
        raise UsageError(f"{option}: the path is empty")
    target = Path(path)
    what = f"{option} {path}"
    if target.is_dir():
        raise UsageError(f"{what}: is a directory")
    parent = target.parent
    if not parent.is_dir():
        reason = "does not exist" if not parent.exists() else "is not a directory"
        raise UsageError(f"{what}: its directory {str(parent)!r} {reason}")
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{what}: the file is not writable")
    _probe_writable(parent, what)
    return target


def check_output_directory(path: str, option: str) -> Path:
    """A directory the command will create (with its parents) or add to: where it exists it is
    a writable directory, else its nearest existing ancestor is. Creates nothing.

    Args:
        path: the option's value.
        option: the option's name, for the message.
    Returns:
        The path.
    """
    if not path:
        raise UsageError(f"{option}: the path is empty")
    target = Path(path)
    what = f"{option} {path}"
    existing = _nearest_existing(target)
    if not existing.is_dir():
        place = "is" if existing == target else f"is under {str(existing)!r}, which is"
        raise UsageError(f"{what}: {place} not a directory")
    _probe_writable(existing, what)
    return target


def write_json(path: Path, data: object) -> None:
    """Write `data` as JSON through a scratch file renamed into place: the file is complete
    or untouched. Raises UsageError when it cannot be written after all."""
    text = json.dumps(data, indent=2) + "\n"
    scratch = None
    try:
        descriptor, scratch = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        with os.fdopen(descriptor, "w") as out:
            out.write(text)
        os.chmod(scratch, 0o666 & ~current_umask())
        os.replace(scratch, path)
    except OSError as error:
        if scratch is not None and os.path.exists(scratch):
            os.unlink(scratch)
        raise UsageError(f"cannot write {str(path)!r}: {error.strerror or error}") from None


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
