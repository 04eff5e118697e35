"""The harness's side of target workers: starting a fork server under a target's Python and
handing out the session processes it forks (properties/targets/worker_main.py is the other
side; properties/targets/isolated.py the allocator proxy that talks to a session).

A worker server is started as `PYTHON -m properties.targets.worker_main FD SPEC` with this
repository first on PYTHONPATH, so the worker runs the harness's own `allocator`, `canary` and
`properties` packages whatever the target's environment has installed (a thin release
environment may point at another checkout through a `.pth`: PYTHONPATH comes before it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from properties.targets import TargetError
from properties.targets.wire import PROTOCOL, decode, encode

START_TIMEOUT = 300.0
"""Seconds the worker may take to import torch and the target."""
MAX_IDLE_SESSIONS = 4
REPOSITORY = Path(__file__).resolve().parents[2]
"""Holds `allocator`, `canary` and `properties`: put on the worker's PYTHONPATH."""


class IsolationError(RuntimeError):
    """The worker machinery itself failed (not the target): a harness problem."""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def interpreter(python: str) -> str:
    """The interpreter named after '@': this one when empty, DIR/bin/python for a directory."""
    if not python:
        return sys.executable
    path = Path(python).expanduser()
    if path.is_dir():
        path = path / "bin" / "python"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise TargetError(f"no Python interpreter at {python!r} (give its path, or a virtual environment's directory)")
    return str(path)


def worker_environment(python: str) -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (unless the packages come from
    an installed site-packages, which would put the harness's whole environment there). Under
    this interpreter also the folders this process imports from outside its installation (a
    test suite's folder, a script's), so that a target that resolves here resolves there."""
    folders = [] if REPOSITORY.name in ("site-packages", "dist-packages") else [str(REPOSITORY)]
    if python == sys.executable:
        installed = tuple(dict.fromkeys((sys.prefix, sys.base_prefix, sys.exec_prefix)))
        local = (os.path.abspath(entry) for entry in sys.path if entry)
        folders += [
            entry
            for entry in local
            if os.path.isdir(entry) and not entry.startswith(installed) and entry not in folders
        ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (*folders, env.get("PYTHONPATH"))))
    return env


@dataclass
class Session:
    """One session process and the harness's end of its socket."""

    sock: socket.socket
    pid: int
    alive: bool = True


class WorkerServer:
    """The harness's side of one fork server: starts it and hands out session processes.

    A session is reused by the next program once its allocator is gone (the session builds a
    new one), until any session of this server crashes or hangs: from then on every program
    gets a fresh session, forked ahead of time, so that each shrinking step runs in a fresh
    process and the minimal program is one that kills (or hangs) a fresh worker."""

    def __init__(self, spec: str, python: str) -> None:
        self.spec, self.python = spec, python
        self.process: subprocess.Popen | None = None
        self.idle: list[Session] = []
        self.spare: socket.socket | None = None
        self.spare_pid = 0
        self.spare_requested = False
        self.fresh_sessions = False
        self.hello = self._start()

    def _start(self) -> list[Any]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [
            self.python,
            "-m",
            "properties.targets.worker_main",
            str(theirs.fileno()),
            self.spec,
        ]
        try:
            self.process = subprocess.Popen(
                command,
                pass_fds=(theirs.fileno(),),
                env=worker_environment(self.python),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as error:
            raise TargetError(f"cannot start {self.python}: {error}") from error
        finally:
            theirs.close()
        self.control = ours
        ours.settimeout(START_TIMEOUT)
        hello = self._reply()
        ours.settimeout(None)
        where = f"the worker for {self.spec!r} under {self.python}"
        if hello is None:
            code = self.process.wait()
            raise TargetError(f"{where} {describe_exit(code)} before it was ready (its error output is above)")
        if hello[0] == "error":
            raise TargetError(f"{where}: {hello[1]}")
        if hello[0] != "hello" or hello[1] != PROTOCOL:
            raise TargetError(
                f"{where} speaks protocol {hello[1:2]}, this harness {PROTOCOL}: run both from one checkout"
            )
        return hello

    def _reply(self) -> list[Any] | None:
        try:
            data = self.control.recv(1 << 16)
        except TimeoutError:
            raise TargetError(f"the worker for {self.spec!r} did not start within {START_TIMEOUT:.0f}s") from None
        except OSError:
            return None
        return decode(bytearray(data[4:])) if data else None

    def _request(self, message: list[Any], fds: tuple[int, ...] = ()) -> list[Any]:
        self._collect_spare()
        try:
            socket.send_fds(self.control, [encode(message)], list(fds))
        except OSError as error:
            raise IsolationError(f"the worker server for {self.spec!r} is gone: {error}") from error
        reply = self._reply()
        if reply is None:
            code = None if self.process is None else self.process.poll()
            raise IsolationError(f"the worker server for {self.spec!r} {describe_exit(code)}")
        return reply

    def _request_spare(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        try:
            socket.send_fds(self.control, [encode(["fork"])], [theirs.fileno()])
        except OSError as error:
            raise IsolationError(f"the worker server for {self.spec!r} is gone: {error}") from error
        finally:
            theirs.close()
        self.spare, self.spare_requested = ours, True
        return ours

    def _collect_spare(self) -> None:
        if self.spare_requested:
            self.spare_requested = False
            reply = self._reply()
            if reply is None or reply[0] != "forked":
                raise IsolationError(f"the worker server for {self.spec!r} did not fork a session: {reply}")
            self.spare_pid = reply[1]

    def session(self) -> Session:
        """An idle session, else a newly forked one (in fresh mode the next is forked meanwhile)."""
        if self.idle and not self.fresh_sessions:
            return self.idle.pop()
        spare = self.spare if self.spare is not None else self._request_spare()
        self._collect_spare()
        taken = Session(spare, self.spare_pid)
        self.spare = None
        if self.fresh_sessions:
            self._request_spare()
        return taken

    def release(self, session: Session) -> None:
        """A session whose allocator is gone: kept for the next program, or ended."""
        if not session.alive:
            return
        if self.fresh_sessions or len(self.idle) >= MAX_IDLE_SESSIONS or self.process is None:
            session.sock.close()
        else:
            self.idle.append(session)

    def exit_code(self, pid: int) -> int:
        """Kill session `pid` if it still runs, and return how it ended (negative: a signal).
        From now on every program gets a fresh session."""
        self.fresh_sessions = True
        for session in self.idle:
            session.sock.close()
        self.idle.clear()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self._request(["status", pid])[1]

    def close(self) -> None:
        if self.process is not None:
            for session in self.idle:
                session.sock.close()
            self.idle.clear()
            self.control.close()
            if self.spare is not None:
                self.spare.close()
            self.process.wait()
            self.process = None
