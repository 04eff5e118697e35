"""A target worker: `python -m properties.targets.worker_main FD SPEC`.

The harness starts it under the target's own Python, with FD one end of a Unix socket pair.
It imports torch and the target once, says hello (protocol version, target name, contract
restrictions, missing capabilities),
then serves as a fork server: for each "fork" message, which carries a fresh socket, it forks
a session process that builds one allocator and answers its calls on that socket until the
harness closes it. Every program so runs in a fresh process, started in milliseconds, and a
target that crashes or hangs takes only its session down. The fork server never builds an
allocator or touches a device itself, so each session initialises CUDA on its own.

What the environment needs: torch and the target's own package; this repository's
`allocator`, `canary` and `properties` packages come from PYTHONPATH, which the harness sets
(or from `pip install --no-deps -e /path/to/swa-canary` there). No Hypothesis, no pytest.

Session messages (properties/targets/wire.py), harness first:
    build SIZE SIZE_SWA PAGE_SIZE DEVICE NEED_SORT DTYPE  -> ready METHODS LAYOUT PAGE_SIZE SIZE SIZE_SWA STATE
    call METHOD ARGS...                                  -> ok RESULT STATE | raised TYPE MESSAGE STATE
    query METHOD ARGS...                                 -> ok RESULT | raised TYPE MESSAGE
    backup                                               -> ok HANDLE STATE | raised ...
    restore HANDLE                                       -> ok None STATE | raised ...
METHODS are the SPEC calls the allocator has, LAYOUT its mapping_layout. STATE is the state after
the call, read the way the probes read it (canary.probes.AllocatorView): one int64 tensor
[full_available, swa_available, available (-1: available_size() is not implemented),
in_free_group, first, len(mapping), len(full_free), len(swa_free), len(translated), mapping
(as the allocator holds it), full_free, swa_free, translated], where translated is
translate_loc_from_full_to_swa(arange(first, tokens + page_size)) and first is -1 (0 for a
mapping without a sentinel); or, when reading the state raised, the list [TYPE, MESSAGE].
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import os
import signal
import socket
import sys
from typing import Any

import torch

from canary.probes import AllocatorView, MappingLayout
from properties.targets import AllocatorConfig, Target, resolve_target
from properties.targets.wire import PROTOCOL, decode, encode, receive, send

PR_SET_PDEATHSIG = 1
SPEC_CALLS = (
    "alloc", "alloc_extend", "alloc_decode", "alloc_extend_swa_tail", "free", "free_swa", "free_full",
    "free_group_begin", "free_group_end", "clear", "backup_state", "restore_state",
)
"""The SPEC §1 calls; the harness's proxy has those of them the allocator has."""
KEPT_EXIT_CODES = 1024


def die_with_parent() -> None:
    """Be killed when the process that started this one exits (Linux), so that a harness killed
    outright leaves no worker behind, even one stuck in a hung call."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed socket still ends every session
        return
    if os.getppid() != parent:
        os._exit(1)


def read_state(allocator: Any) -> Any:
    """The allocator's state as one int64 tensor (module docstring), or [TYPE, MESSAGE]."""
    try:
        view = AllocatorView.of(allocator)
        # Without a sentinel (a padded mapping) translating -1 is no call the allocator takes.
        first = 0 if "SENTINEL" in view.inapplicable else -1
        every_index = torch.arange(first, view.mapping.numel() - 1, device=view.mapping.device)
        translated = allocator.translate_loc_from_full_to_swa(every_index).reshape(-1).to(torch.int64)
        parts = (allocator.full_to_swa_index_mapping.to(torch.int64), view.full_free, view.swa_free, translated)
        available = -1 if "AVAIL" in view.inapplicable else view.available
        head = [view.full_available, view.swa_available, available, int(view.in_free_group), first]
        head += [part.numel() for part in parts]
        device = view.mapping.device
        return torch.cat([torch.tensor(head, dtype=torch.int64, device=device), *(part.to(device) for part in parts)])
    except Exception as error:  # the harness raises it where it reads the state, as in process
        return [type(error).__name__, str(error)]


def _raised(error: BaseException) -> list[Any]:
    return ["raised", type(error).__name__, str(error)]


class Session:
    """One allocator and the calls on it, in a forked process."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.allocator: Any = None
        self.device = "cpu"
        self.saved: dict[int, Any] = {}

    def answer(self, message: list[Any]) -> list[Any]:
        kind, *rest = message
        if kind == "build":
            return self.build(*rest)
        try:
            if kind == "call":
                return ["ok", getattr(self.allocator, rest[0])(*rest[1:]), read_state(self.allocator)]
            if kind == "query":
                return ["ok", getattr(self.allocator, rest[0])(*rest[1:])]
            if kind == "backup":
                handle = len(self.saved) + 1
                self.saved[handle] = self.allocator.backup_state()
                return ["ok", handle, read_state(self.allocator)]
            if kind == "restore":
                self.allocator.restore_state(self.saved[rest[0]])
                return ["ok", None, read_state(self.allocator)]
        except Exception as error:  # the target raised: an outcome the harness judges
            return [*_raised(error), read_state(self.allocator)] if kind != "query" else _raised(error)
        raise ValueError(f"unknown request {kind!r}")

    def build(self, size: int, size_swa: int, page_size: int, device: str, need_sort: bool, dtype: str) -> list[Any]:
        self.device, self.allocator = device, None
        self.saved.clear()
        config = AllocatorConfig(size, size_swa, page_size, device, need_sort, getattr(torch, dtype))
        try:
            self.allocator = self.target.factory(config)
        except Exception as error:  # a target that cannot be built is a finding, as in process
            return _raised(error)
        allocator = self.allocator
        methods = [method for method in SPEC_CALLS if callable(getattr(allocator, method, None))]
        layout = str(getattr(allocator, "mapping_layout", MappingLayout.SENTINEL))
        sizes = [
            getattr(allocator, "size_full", None) or getattr(allocator, "size", size),
            getattr(allocator, "size_swa", size_swa),
        ]
        page = getattr(allocator, "page_size", page_size)
        return ["ready", methods, layout, *(_plain_int(value) for value in (page, *sizes)), read_state(allocator)]


def _plain_int(value: Any) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def serve_session(sock: socket.socket, target: Target) -> None:
    """Answer one harness's requests until it closes the socket."""
    session = Session(target)
    while True:
        message = receive(sock, session.device)
        if message is None:
            return
        reply = session.answer(message)
        if isinstance(reply[1], torch.Tensor) and reply[0] == "ok":
            reply[1] = reply[1].to(torch.int64)
        send(sock, reply)


def serve_forks(control: socket.socket, target: Target) -> None:
    """Fork a session for each "fork" request; answer "status PID" with its exit code
    (negative: the signal that killed it); stop when the harness goes away."""
    exited: dict[int, int] = {}
    while True:
        try:
            data, fds, _flags, _address = socket.recv_fds(control, 1 << 16, 1)
        except OSError:  # the harness is gone
            return
        if not data:
            return
        kind, *rest = decode(bytearray(data[4:]))
        if kind == "fork":
            pid = os.fork()
            if pid == 0:
                control.close()
                die_with_parent()
                try:
                    serve_session(socket.socket(fileno=fds[0]), target)
                finally:
                    os._exit(0)  # skip interpreter teardown: the session is over
            os.close(fds[0])
            reply = ["forked", pid]
        elif kind == "status":
            if rest[0] not in exited:
                exited[rest[0]] = os.waitstatus_to_exitcode(os.waitpid(rest[0], 0)[1])
            reply = ["status", exited.pop(rest[0])]
        else:
            reply = ["error", f"unknown request {kind!r}"]
        _reap(exited)
        try:
            control.sendall(encode(reply))
        except OSError:
            return


def _reap(exited: dict[int, int]) -> None:
    """Collect sessions that have ended, keeping the latest exit codes for a later "status"
    (the harness asks right after a session died, so old ones can go)."""
    while len(exited) > KEPT_EXIT_CODES:
        del exited[next(iter(exited))]
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        exited[pid] = os.waitstatus_to_exitcode(status)


def warm_up() -> None:
    """Build a reference allocator on the CPU and read it back once, so that torch's lazy
    initialisation happens here, once, and not in every forked session. The reference, not
    the target: a target that crashes when built must crash in a session, as a finding."""
    from properties.targets import reference_factory

    allocator = reference_factory(AllocatorConfig(16, 16, 4))
    prefix, seq = torch.tensor([0]), torch.tensor([5])
    allocator.alloc_extend(prefix, prefix, seq, seq, torch.tensor([-1]), 5)
    read_state(allocator)


def main(argv: list[str]) -> int:
    control = socket.socket(fileno=int(argv[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness decides when workers stop
    die_with_parent()
    faulthandler.enable()  # a crashing session prints where it died (on the harness's stderr)
    try:
        target = resolve_target(argv[1])
    except Exception as error:  # reported to the harness, which exits 2: an unusable target
        control.sendall(encode(["error", f"{type(error).__name__}: {error}"]))
        return 2
    # One intra-op thread, as in the harness (properties.settings.prepare_process): on these small
    # tensors more threads only contend, and their spinning costs every call.
    torch.set_num_threads(1)
    warm_up()
    gc.freeze()  # the sessions' garbage collector leaves what is here alone: fewer pages copied
    restrictions, missing = target.contract.restrictions(), target.capabilities.missing()
    control.sendall(
        encode(["hello", PROTOCOL, target.name, restrictions, missing, sys.version.split()[0], torch.__version__])
    )
    serve_forks(control, target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
