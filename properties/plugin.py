"""pytest plugin: choose the device and the allocator the swa-canary machines run against.

Options: --swa-device (cpu | cuda), --swa-target (reference | module:factory); the
SWA_DEVICE / SWA_TARGET environment variables give the defaults.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("swa-canary")
    group.addoption(
        "--swa-device",
        default=os.environ.get("SWA_DEVICE", "cpu"),
        choices=("cpu", "cuda"),
        help="device the allocator under test runs on (default: cpu, or $SWA_DEVICE)",
    )
    group.addoption(
        "--swa-target",
        default=os.environ.get("SWA_TARGET", "reference"),
        help="allocator under test: 'reference' or 'module:factory' (default: reference, or $SWA_TARGET)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--swa-device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--swa-device cuda was given but torch sees no CUDA device")


@pytest.fixture
def swa_device(request: pytest.FixtureRequest) -> torch.device:
    """The torch device of the allocator under test."""
    return torch.device(request.config.getoption("--swa-device"))


@pytest.fixture
def swa_target(request: pytest.FixtureRequest) -> str:
    """The --swa-target spec of the allocator under test."""
    return request.config.getoption("--swa-target")
