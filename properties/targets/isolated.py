"""Targets in their own process: `SPEC@PYTHON` runs target SPEC in a worker under PYTHON.

PYTHON is an interpreter (`/path/to/venv/bin/python`), a virtual environment's directory
(its `bin/python`), or nothing (`reference@`: this interpreter, as `--isolate` asks). The
machines stay in the harness process and drive an `IsolatedAllocator`, which looks like an
allocator to them, to the probes and to the driver, and forwards each call to a session
process that holds the real allocator (properties/targets/worker_main.py). Every program runs
in a fresh session, forked from a server that has torch and the target imported, so a
program costs a fork, not an interpreter start.

One round trip per allocator call: the reply carries the call's result and the state after
it (mapping, both pools' free units, the three sizes, the free-group flag, the translation of
every index), so the step's read-back costs nothing more. A session that dies during a call
raises `TargetCrashed` (CRASH), one that does not answer within the call timeout is killed and
raises `TargetHung` (HANG): findings like any other, shrunk by re-running shorter programs,
each in a fresh session.
"""

from __future__ import annotations

import builtins
import functools
import os
import weakref
from typing import Any, Callable

import torch

from properties.targets import AllocatorConfig, Target, TargetCapabilities, TargetContract, TargetError
from properties.targets.wire import OnDevice, receive, send
from properties.targets.workers import IsolationError, Session, WorkerServer, describe_exit, interpreter

DEFAULT_CALL_TIMEOUT = 60.0
"""Seconds one call may take before its session is killed as hung (SWA_CALL_TIMEOUT overrides)."""
CALLS = frozenset(("alloc", "alloc_extend", "alloc_decode", "alloc_extend_swa_tail", "free", "free_swa", "free_full",
                   "free_group_begin", "free_group_end", "clear"))
"""The calls forwarded as they are (backup_state / restore_state pass a handle instead)."""
HEAD = 9
"""Numbers before the tensors of a state read-back (worker_main's docstring)."""


class TargetCrashed(Exception):
    """The target's process died during a call (a signal, an abort, os._exit)."""


class TargetHung(Exception):
    """A call did not return within the call timeout; its process was killed."""


class ReadBack:
    """The state a session sent with its last reply, unpacked when first read."""

    def __init__(self) -> None:
        self.raw: Any = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.sizes: list[int] = []
        self.group_open = False
        self.first = -1

    def keep(self, raw: Any) -> None:
        self.raw, self.parts = raw, ()

    def read(self) -> tuple[torch.Tensor, ...]:
        """(mapping, full free units, SWA free units, translation of every index); raises what
        reading the state raised in the session."""
        if not self.parts:
            if isinstance(self.raw, list):
                raise _rebuilt(*self.raw)
            head = self.raw[:HEAD].tolist()
            self.sizes, self.group_open, self.first = head[:3], bool(head[3]), head[4]
            self.parts = tuple(torch.split(self.raw[HEAD:], head[5:]))
        return self.parts


class _PoolView:
    """What the probes read of one pool: its free units, as of the last call."""

    def __init__(self, read_back: ReadBack, index: int) -> None:
        self.read_back, self.index = read_back, index

    def get_all_free_pages(self) -> torch.Tensor:
        return self.read_back.read()[self.index]


class RemoteState:
    """A backup_state() kept in the session; restore_state takes it back."""

    def __init__(self, handle: int) -> None:
        self.handle = handle


class IsolatedAllocator:
    """A SPEC §1 allocator whose calls run in a session process. Its state, as of the last
    call, is on the CPU: mapping, free units and sizes are read from it, not from the session."""

    def __init__(self, server: WorkerServer, config: AllocatorConfig, call_timeout: float) -> None:
        self.server, self.call_timeout, self.device = server, call_timeout, config.device
        self.session: Session | None = server.session()
        self.session.sock.settimeout(call_timeout)
        # Gives the session back once this allocator is gone; a finalizer, not __del__, so the
        # session stays out of any garbage cycle the allocator is part of.
        self.close = weakref.finalize(self, server.release, self.session)
        self.read_back = ReadBack()
        self.full_attn_allocator, self.swa_attn_allocator = _PoolView(self.read_back, 1), _PoolView(self.read_back, 2)
        dtype = str(config.dtype).removeprefix("torch.")
        build = ["build", config.size, config.size_swa, config.page_size, config.device, config.need_sort, dtype]
        ready = self._exchange(build, "__init__")
        methods, self.mapping_layout, self.page_size, self.size_full, self.size_swa, state = ready[1:]
        self.methods = frozenset(methods)
        self.size = self.size_full
        self.read_back.keep(state)

    # ---------------------------------------------------------------- exchanging
    def _exchange(self, message: list[Any], what: str) -> list[Any]:
        """Send one request, return the reply; raise what the target raised, or TargetCrashed /
        TargetHung when its process dies or does not answer."""
        if self.session is None:
            raise TargetCrashed(f"the target's process is gone (an earlier call ended it); {what} was not made")
        try:
            send(self.session.sock, message)
            reply = receive(self.session.sock, "cpu")
        except TimeoutError:
            code = self._end()
            raise TargetHung(
                f"{what} did not return within {self.call_timeout:g}s; the target's process {describe_exit(code)}"
            ) from None
        except OSError:
            reply = None
        except BaseException:  # interrupted mid-call (Ctrl-C, a campaign stopping): the session is unusable
            self._end()
            raise
        if reply is None:
            code = self._end()
            raise TargetCrashed(f"the target's process {describe_exit(code)} during {what}")
        if reply[0] == "raised":
            if len(reply) > 3:
                self.read_back.keep(reply[3])
            raise _rebuilt(reply[1], reply[2])
        return reply

    def _end(self) -> int | None:
        """The session is dead or unusable: end it and say how it ended."""
        session, self.session = self.session, None
        if session is None:
            return None
        session.alive = False
        session.sock.close()
        try:
            return self.server.exit_code(session.pid)
        except IsolationError:
            return None

    def _call(self, method: str, *args: Any) -> Any:
        what = f"{method}()" if not args else f"{method}(...)"
        wire_args = [
            OnDevice(arg) if isinstance(arg, torch.Tensor) and arg.device.type != "cpu" else arg for arg in args
        ]
        _ok, result, state = self._exchange(["call", method, *wire_args], what)
        self.read_back.keep(state)
        return result.to(self.device) if isinstance(result, torch.Tensor) and self.device != "cpu" else result

    # ------------------------------------------------------------ state read-back
    @property
    def full_to_swa_index_mapping(self) -> torch.Tensor:
        return self.read_back.read()[0]

    @property
    def in_free_group(self) -> bool:
        self.read_back.read()
        return self.read_back.group_open

    def full_available_size(self) -> int:
        self.read_back.read()
        return self.read_back.sizes[0]

    def swa_available_size(self) -> int:
        self.read_back.read()
        return self.read_back.sizes[1]

    def available_size(self) -> int:
        self.read_back.read()
        if self.read_back.sizes[2] < 0:
            raise NotImplementedError("the target's available_size() is not implemented")
        return self.read_back.sizes[2]

    def translate_loc_from_full_to_swa(self, kv_indices: torch.Tensor) -> torch.Tensor:
        """From the last call's translation of every index when the indices are CPU integers
        in range (the per-step checks ask for every index or for the ones a step touched):
        SPEC §1 translates index by index, so a gather from it is the allocator's answer;
        anything else from the session."""
        translated = self.read_back.read()[3]
        first, count = self.read_back.first, translated.numel()
        if kv_indices.device.type == "cpu" and not kv_indices.is_floating_point() and kv_indices.dtype != torch.bool:
            if kv_indices.numel() == 0:
                return translated[:0].reshape(kv_indices.shape)
            if int(kv_indices.min()) >= first and int(kv_indices.max()) < first + count:
                return translated[kv_indices.to(torch.int64) - first]
        _ok, result = self._exchange(
            ["query", "translate_loc_from_full_to_swa", OnDevice(kv_indices)], "translate_loc_from_full_to_swa(...)"
        )
        return result

    # ---------------------------------------------------------------- the calls
    def __getattr__(self, name: str) -> Callable[..., Any]:
        """The SPEC calls the target's allocator has (so hasattr answers as it would)."""
        if name in CALLS and name in self.__dict__.get("methods", ()):
            return functools.partial(self._call, name)
        raise AttributeError(f"{type(self).__name__} of this target has no attribute {name!r}")

    @property
    def backup_state(self) -> Callable[[], RemoteState]:
        """The target's backup_state; absent (AttributeError) when it has none."""
        if "backup_state" not in self.methods:
            raise AttributeError("the target has no backup_state")
        return self._backup_state

    @property
    def restore_state(self) -> Callable[[RemoteState], None]:
        if "restore_state" not in self.methods:
            raise AttributeError("the target has no restore_state")
        return self._restore_state

    def _backup_state(self) -> RemoteState:
        _ok, handle, state = self._exchange(["backup"], "backup_state()")
        self.read_back.keep(state)
        return RemoteState(handle)

    def _restore_state(self, state: RemoteState) -> None:
        _ok, _none, read_back = self._exchange(["restore", state.handle], "restore_state(...)")
        self.read_back.keep(read_back)


class RemoteError(Exception):
    """An exception the target raised whose type is not a builtin one: its type's name leads."""


def _rebuilt(type_name: str, message: str) -> Exception:
    """The target's exception, as its builtin type when it has one."""
    kind = getattr(builtins, type_name, None)
    if isinstance(kind, type) and issubclass(kind, Exception) and kind is not RemoteError:
        try:
            return kind(message)
        except Exception:  # an exception type whose constructor wants more
            pass
    return RemoteError(f"{type_name}: {message}")


# ---------------------------------------------------------------- targets
_SERVERS: dict[tuple[str, str], WorkerServer] = {}


def call_timeout() -> float:
    """SWA_CALL_TIMEOUT, else DEFAULT_CALL_TIMEOUT."""
    text = os.environ.get("SWA_CALL_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_CALL_TIMEOUT
    except ValueError:
        raise TargetError(f"SWA_CALL_TIMEOUT={text!r} is not a number of seconds") from None
    if not value > 0:
        raise TargetError(f"SWA_CALL_TIMEOUT={text!r} must be positive")
    return value


def isolated_target(spec: str, python: str, name: str) -> Target:
    """Target `spec` (no '@') run in a worker under `python` ('' for this interpreter); one
    worker server per (spec, python) in this process. Raises TargetError when it cannot start
    or the worker cannot resolve `spec`."""
    if not spec:
        raise TargetError(f"target {name!r} names no target before '@'")
    executable = interpreter(python)
    timeout = call_timeout()
    key = (spec, executable)
    if key not in _SERVERS:
        _SERVERS[key] = WorkerServer(spec, executable)
    server = _SERVERS[key]
    contract = TargetContract(**{restriction: True for restriction in server.hello[3]})
    capabilities = TargetCapabilities(**{capability: False for capability in server.hello[4]})
    factory: Callable[[AllocatorConfig], IsolatedAllocator] = lambda config: IsolatedAllocator(server, config, timeout)  # noqa: E731
    factory.__name__ = name
    return Target(name, factory, contract, capabilities)


def close_servers() -> None:
    """Stop every worker server this process started."""
    while _SERVERS:
        _SERVERS.popitem()[1].close()
