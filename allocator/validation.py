"""Input checks shared by every allocator: each raises a typed error before any state changes."""

from __future__ import annotations

import torch

from allocator.errors import (
    ConfigIntegerError,
    IndexIntegerError,
    IntegerError,
    InvalidConfigError,
    InvalidIndexError,
)


def canonical_device(device: torch.device | str) -> torch.device:
    """The device with its index filled in, so that tensors' devices compare equal to it.
    InvalidConfigError for a device torch does not know or cannot use here (cuda without a
    GPU, an index past the last GPU)."""
    if not isinstance(device, (torch.device, str)):
        raise InvalidConfigError(f"device must be a torch.device or a str, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise InvalidConfigError(f"device {device!r} is not a torch device: {error}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidConfigError("device cuda, but torch sees no CUDA device")
        if device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        if device.index >= count:
            raise InvalidConfigError(f"device {device}, but torch sees {count} CUDA device(s)")
        return device
    if device.type not in ("cpu", "meta"):
        raise InvalidConfigError(f"device {device} is not supported (cpu or cuda)")
    return device


def check_int(name: str, value: object, minimum: int | None = None, error: type[IntegerError] = IntegerError) -> int:
    """The one strict integer check: `value` when it is a Python int (a bool is not) >= `minimum`.

    Args:
        name: what the value is, for the message ("page_size", "record index").
        value: the value to check.
        minimum: the smallest value allowed; None for no bound.
        error: the IntegerError subclass to raise (the caller layer's flavour of it).

    Returns:
        The value, typed as int.

    Raises:
        error: "NAME must be an int[ >= MINIMUM], got VALUE".
    """
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise error(f"{name} must be an int{bound}, got {value!r:.60}")
    return value


def check_dtype(dtype: object) -> torch.dtype:
    """The KV dtype: a torch.dtype (the allocator keeps it for the KV cache it serves)."""
    if not isinstance(dtype, torch.dtype):
        raise InvalidConfigError(f"dtype must be a torch.dtype, got {dtype!r}")
    return dtype


def check_pool_config(size: int, page_size: int, name: str = "size") -> None:
    """A pool of `size` slots in pages of `page_size`: both ints >= 1, size a multiple of the page."""
    check_int(name, size, 1, ConfigIntegerError)
    check_int("page_size", page_size, 1, ConfigIntegerError)
    if size % page_size:
        raise InvalidConfigError(f"{name}={size} is not a multiple of page_size={page_size}")


def check_count(name: str, value: object) -> int:
    """A number of slots or tokens asked of a call: an int >= 0."""
    return check_int(name, value, 0, IndexIntegerError)


def check_vector(name: str, tensor: object, device: torch.device, length: int | None = None) -> torch.Tensor:
    """A 1-D int64 tensor on `device` (and of `length` when given), else InvalidIndexError."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidIndexError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.int64:
        raise InvalidIndexError(f"{name} must be int64, got {tensor.dtype}")
    if tensor.device != device:
        raise InvalidIndexError(f"{name} must be on {device}, got {tensor.device}")
    if tensor.dim() != 1:
        raise InvalidIndexError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if length is not None and tensor.numel() != length:
        raise InvalidIndexError(f"{name} must have {length} entries, got {tensor.numel()}")
    return tensor


def check_range(name: str, tensor: torch.Tensor, low: int, high: int) -> None:
    """Every value in [low, high). Reads the bounds back, so it synchronises on CUDA."""
    if tensor.numel() == 0:
        return
    smallest, largest = torch.aminmax(tensor)
    if int(smallest) < low or int(largest) >= high:
        raise InvalidIndexError(
            f"{name} holds values in [{int(smallest)}, {int(largest)}], outside the valid range [{low}, {high})"
        )
