"""Input checks shared by every allocator: each raises a typed error before any state changes."""

from __future__ import annotations

import torch

from allocator.errors import InvalidConfigError, InvalidIndexError


def canonical_device(device: torch.device | str) -> torch.device:
    """The device with its index filled in, so that tensors' devices compare equal to it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_pool_config(size: int, page_size: int, name: str = "size") -> None:
    for label, value in ((name, size), ("page_size", page_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfigError(f"{label} must be an int, got {type(value).__name__}")
    if page_size < 1:
        raise InvalidConfigError(f"page_size must be >= 1, got {page_size}")
    if size <= 0:
        raise InvalidConfigError(f"{name} must be > 0, got {size}")
    if size % page_size:
        raise InvalidConfigError(f"{name}={size} is not a multiple of page_size={page_size}")


def check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidIndexError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise InvalidIndexError(f"{name} must be >= 0, got {value}")
    return value


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
