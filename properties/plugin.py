"""pytest plugin: choose the device and the allocator the swa-canary machines run against.

Each setting comes from the command line, else the environment, else the ini file:
  --swa-device / SWA_DEVICE / swa_device      cpu (default) or cuda
  --swa-target / SWA_TARGET / swa_target      reference (default), sglang, or module:factory
A repository checks its own allocator with one line of configuration, for example
`swa_target = mypkg.kv:make_allocator` in its pytest ini, and a test module holding
`from properties.suite import *`.
The Hypothesis profile is `ci` under CI and `dev` elsewhere, unless --hypothesis-profile says.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from properties.settings import default_profile

SETTINGS = {"swa_device": "cpu", "swa_target": "reference"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("swa-canary")
    group.addoption(
        "--swa-device", default=None, choices=("cpu", "cuda"), help="device of the allocator under test (default cpu)"
    )
    group.addoption(
        "--swa-target", default=None, help="allocator under test: reference, sglang or module:factory"
    )
    parser.addini("swa_device", "device of the allocator under test", default=None)
    parser.addini("swa_target", "allocator under test: reference, sglang or module:factory", default=None)


def setting(config: pytest.Config, name: str) -> str:
    """Command line, then environment, then ini, then the built-in default."""
    return (
        config.getoption(name)
        or os.environ.get(name.upper())
        or config.getini(name)
        or SETTINGS[name]
    )


def pytest_configure(config: pytest.Config) -> None:
    if setting(config, "swa_device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("the swa-canary device is cuda but torch sees no CUDA device")
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile(default_profile())


@pytest.fixture
def swa_device(request: pytest.FixtureRequest) -> torch.device:
    """The torch device of the allocator under test."""
    return torch.device(setting(request.config, "swa_device"))


@pytest.fixture
def swa_target(request: pytest.FixtureRequest) -> str:
    """The target spec of the allocator under test."""
    return setting(request.config, "swa_target")
