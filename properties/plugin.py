"""pytest plugin: choose the device, the allocator and the Hypothesis profile the swa-canary
machines run with.

Each setting comes from the command line, else the environment, else the ini file:
  --swa-device / SWA_DEVICE / swa_device      cpu (default) or cuda
  --swa-target / SWA_TARGET / swa_target      reference (default), sglang, or module:factory
A repository checks its own allocator with one line of configuration, for example
`swa_target = mypkg.kv:make_allocator` in its pytest ini, and a test module holding
`from properties.suite import *`.
The machines run under our profile `ci` under CI and `dev` elsewhere, unless
--hypothesis-profile names one of ours (`properties.settings.PROFILES`). The profile is given to
the machines alone: the plugin loads no profile, so every other test keeps its own settings, and
it imports neither torch nor the machines until a test module imports the suite.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
    from hypothesis import settings

SETTINGS = {"swa_device": "cpu", "swa_target": "reference"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("swa-canary")
    group.addoption(
        "--swa-device", default=None, choices=("cpu", "cuda"), help="device of the allocator under test (default cpu)"
    )
    group.addoption("--swa-target", default=None, help="allocator under test: reference, sglang or module:factory")
    parser.addini("swa_device", "device of the allocator under test", default=None)
    parser.addini("swa_target", "allocator under test: reference, sglang or module:factory", default=None)


def setting(config: pytest.Config, name: str) -> str:
    """Command line, then environment, then ini, then the built-in default."""
    return config.getoption(name) or os.environ.get(name.upper()) or config.getini(name) or SETTINGS[name]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if setting(config, "swa_device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("the swa-canary device is cuda but torch sees no CUDA device")
    profile = config.getoption("hypothesis_profile", None)
    if profile:
        _let_hypothesis_load(profile)


def _let_hypothesis_load(profile: str) -> None:
    """Before Hypothesis's plugin loads --hypothesis-profile: where it names one of our profiles
    and the project registered none of that name, register it as the profile already active, so
    that the option picks ours for the machines and changes nothing for the project's tests."""
    from hypothesis import settings
    from hypothesis.errors import InvalidArgument

    from properties.settings import PROFILES

    if profile not in PROFILES:
        return
    try:
        settings.get_profile(profile)
    except InvalidArgument:
        settings.register_profile(profile, settings.default)


@pytest.fixture
def swa_device(request: pytest.FixtureRequest) -> torch.device:
    """The torch device of the allocator under test."""
    import torch

    return torch.device(setting(request.config, "swa_device"))


@pytest.fixture
def swa_target(request: pytest.FixtureRequest) -> str:
    """The target spec of the allocator under test."""
    return setting(request.config, "swa_target")


@pytest.fixture
def swa_settings(request: pytest.FixtureRequest) -> settings:
    """The Hypothesis settings the machines run under (our profile, whatever the project loads)."""
    from properties.settings import machine_settings

    return machine_settings(request.config.getoption("hypothesis_profile", None))
