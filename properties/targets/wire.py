"""The messages between the harness and a target worker: length-prefixed frames, no pickle.

A frame is a little-endian u32 byte count, then a message: a sequence of tagged values, each
a one-byte tag and its payload.

    N            None
    T / F        True / False
    i  <q>       an int (int64)
    s  <I> utf8  a str
    a  <I> raw   a CPU int64 tensor: the element count, then its bytes (native order)
    A  <I> raw   the same, for a tensor the receiver puts on its allocator's device
    l  <I> ...   a list of values

Tensors travel as their raw bytes and come back as views of the received frame, so a step's
whole state read-back is one frame and no per-element conversion. Both ends run on the same
machine, so native byte order is the order of both.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from typing import Any, Sequence

import torch

LENGTH = struct.Struct("<I")
INT = struct.Struct("<q")
COUNT = struct.Struct("<I")
PROTOCOL = 2
"""Bumped whenever a message changes: the harness refuses a worker that speaks another."""


class WireError(ValueError):
    """A frame that does not decode, or a value that has no encoding."""


class OnDevice:
    """Marks a tensor argument that belongs on the allocator's device (tag A), not the CPU."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw int64 bytes of a tensor (copied to the CPU, made contiguous)."""
    host = tensor.detach().to(device="cpu", dtype=torch.int64).contiguous()
    return ctypes.string_at(host.data_ptr(), host.numel() * 8) if host.numel() else b""


def _encode(value: Any, out: list[bytes]) -> None:
    if value is None:
        out.append(b"N")
    elif value is True or value is False:
        out.append(b"T" if value else b"F")
    elif isinstance(value, int):
        out += (b"i", INT.pack(value))
    elif isinstance(value, str):
        data = value.encode()
        out += (b"s", COUNT.pack(len(data)), data)
    elif isinstance(value, (torch.Tensor, OnDevice)):
        tensor = value.tensor if isinstance(value, OnDevice) else value
        out += (b"A" if isinstance(value, OnDevice) else b"a", COUNT.pack(tensor.numel()), tensor_bytes(tensor))
    elif isinstance(value, (list, tuple)):
        out += (b"l", COUNT.pack(len(value)))
        for item in value:
            _encode(item, out)
    else:
        raise WireError(f"no encoding for a {type(value).__name__}")


def encode(message: Sequence[Any]) -> bytes:
    """One frame (length prefix included) holding the values of `message`."""
    parts: list[bytes] = []
    for value in message:
        _encode(value, parts)
    body = b"".join(parts)
    return LENGTH.pack(len(body)) + body


def decode(body: bytearray, device: str = "cpu") -> list[Any]:
    """The values of one frame's body; A-tagged tensors are put on `device`."""
    values, offset = [], 0
    while offset < len(body):
        value, offset = _decode(body, offset, device)
        values.append(value)
    return values


def _decode(body: bytearray, offset: int, device: str) -> tuple[Any, int]:
    tag = bytes(body[offset : offset + 1])
    offset += 1
    try:
        if tag in (b"N", b"T", b"F"):
            return {b"N": None, b"T": True, b"F": False}[tag], offset
        if tag == b"i":
            return INT.unpack_from(body, offset)[0], offset + INT.size
        count = COUNT.unpack_from(body, offset)[0]
        offset += COUNT.size
        if tag == b"s":
            return body[offset : offset + count].decode(), offset + count
        if tag in (b"a", b"A"):
            if offset + count * 8 > len(body):
                raise WireError("a tensor runs past the end of its frame")
            tensor = torch.frombuffer(body, dtype=torch.int64, count=count, offset=offset) if count else torch.empty(
                0, dtype=torch.int64
            )
            return (tensor.to(device) if tag == b"A" else tensor), offset + count * 8
        if tag == b"l":
            items = []
            for _ in range(count):
                item, offset = _decode(body, offset, device)
                items.append(item)
            return items, offset
    except struct.error as error:
        raise WireError(f"truncated frame: {error}") from error
    raise WireError(f"unknown tag {bytes(tag)!r} at byte {offset - 1}")


def send(sock: socket.socket, message: Sequence[Any]) -> None:
    sock.sendall(encode(message))


def _receive_exactly(sock: socket.socket, count: int) -> bytearray | None:
    """`count` bytes, or None if the peer closed the connection first."""
    buffer = bytearray(count)
    view, got = memoryview(buffer), 0
    while got < count:
        received = sock.recv_into(view[got:])
        if not received:
            return None
        got += received
    return buffer


def receive(sock: socket.socket, device: str = "cpu") -> list[Any] | None:
    """The next message, or None if the peer closed the connection (it exited or died).
    Raises socket.timeout (TimeoutError) when the socket's timeout passes first."""
    header = _receive_exactly(sock, LENGTH.size)
    if header is None:
        return None
    body = _receive_exactly(sock, LENGTH.unpack(header)[0])
    return None if body is None else decode(body, device)
