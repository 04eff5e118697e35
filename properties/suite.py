"""The state machines as pytest tests, against the target the plugin selects.

A repository runs them on its own allocator by importing this module's tests into one of its
test modules (`from properties.suite import *`) and naming its factory with --swa-target.
They run under the plugin's `swa_settings` (our profile), not the project's Hypothesis profile.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from properties.machines import MACHINES, machine_classes

__all__ = ["test_state_machine"]


@pytest.mark.parametrize("machine_name", sorted(MACHINES))
def test_state_machine(machine_name: str, swa_target: str, swa_device: torch.device, swa_settings: settings) -> None:
    run_state_machine_as_test(machine_classes(swa_target, swa_device.type)[machine_name], settings=swa_settings)
