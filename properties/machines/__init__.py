"""Hypothesis state machines that drive an allocator through random programs.

`base.AllocatorMachine` owns one allocator (built by its target factory), a reference
`SWAModel` (model.py) and the step check (step_checks.py); `slot.SlotMachine` works on slots
at page size 1, `request.RequestMachinePS*` on requests at one page size each. `MACHINES`
names every machine; `machine_classes` binds them to a target and a device.
"""

from __future__ import annotations

from properties.machines.base import (
    CALL_PATTERNS,
    ENDINGS,
    AllocatorMachine,
    CallPattern,
)
from properties.machines.request import (
    REQUEST_MACHINES,
    PagedRequestMachine,
    RequestMachine,
)
from properties.machines.slot import Holding, SlotMachine
from properties.targets import Factory, Target, as_target

__all__ = [
    "CALL_PATTERNS",
    "ENDINGS",
    "MACHINES",
    "REQUEST_PAGE_SIZES",
    "AllocatorMachine",
    "CallPattern",
    "Holding",
    "PagedRequestMachine",
    "RequestMachine",
    "SlotMachine",
    "machine_classes",
]

REQUEST_PAGE_SIZES = tuple(machine.page_size for machine in REQUEST_MACHINES)

MACHINES: dict[str, type[AllocatorMachine]] = {"SlotMachine": SlotMachine}
MACHINES.update({machine.__name__: machine for machine in REQUEST_MACHINES})


def machine_classes(
    target: str | Factory | Target = "reference", device: str = "cpu"
) -> dict[str, type[AllocatorMachine]]:
    """Every machine the target can be driven by, bound to it (a spec, a factory or a Target,
    with its contract and capabilities) and to a device.

    Args:
        target: what the machines drive.
        device: where the allocator's tensors live.

    Returns:
        Machine name -> a subclass of that machine with the target's factory, contract and capabilities.
    """
    bound = as_target(target)
    settings = {
        "factory": staticmethod(bound.factory),
        "contract": bound.contract,
        "capabilities": bound.capabilities,
        "device": device,
    }
    # A target without page sizes above 1 is driven by the page-size-1 machines only.
    return {
        name: type(name, (machine,), settings)
        for name, machine in MACHINES.items()
        if bound.capabilities.paged or getattr(machine, "page_size", 1) == 1
    }
