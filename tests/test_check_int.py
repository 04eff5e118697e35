"""The one strict integer check (`allocator.validation.check_int`) and its error flavours."""

from __future__ import annotations

import pytest
import torch

from allocator import ConfigIntegerError, IndexIntegerError, IntegerError, InvalidConfigError, InvalidIndexError
from allocator.validation import check_int
from canary.divergence import DivergenceInputError, DivergenceIntegerError
from canary.monitor import CanaryConfigError, CanaryIntegerError
from canary.probes import ProbeInputError, ProbeIntegerError
from canary.report import RecordFormatError, RecordIntegerError
from canary.simulate import SimulationConfigError, SimulationIntegerError
from canary.snapshot import SnapshotError, SnapshotIntegerError


@pytest.mark.parametrize(
    ("value", "minimum", "message"),
    [
        (True, None, "count must be an int, got True"),
        (2.0, None, "count must be an int, got 2.0"),
        ("3", 0, "count must be an int >= 0, got '3'"),
        (torch.tensor(3), None, "count must be an int, got tensor(3)"),
        (-1, 0, "count must be an int >= 0, got -1"),
    ],
)
def test_anything_but_an_int_of_at_least_the_bound_is_refused(value: object, minimum: int | None, message: str) -> None:
    with pytest.raises(IntegerError) as caught:
        check_int("count", value, minimum)
    assert str(caught.value) == message


def test_an_int_of_at_least_the_bound_comes_back() -> None:
    assert check_int("count", 0, 0) == 0
    assert check_int("count", -5) == -5


def test_a_long_value_is_cut_short_in_the_message() -> None:
    with pytest.raises(IntegerError) as caught:
        check_int("count", "x" * 500)
    assert len(str(caught.value)) < 100


@pytest.mark.parametrize(
    ("flavour", "layer_error"),
    [
        (ConfigIntegerError, InvalidConfigError),
        (IndexIntegerError, InvalidIndexError),
        (CanaryIntegerError, CanaryConfigError),
        (ProbeIntegerError, ProbeInputError),
        (DivergenceIntegerError, DivergenceInputError),
        (SimulationIntegerError, SimulationConfigError),
        (SnapshotIntegerError, SnapshotError),
        (RecordIntegerError, RecordFormatError),
    ],
)
def test_each_flavour_is_caught_as_the_integer_error_and_as_its_layer_error(
    flavour: type[IntegerError], layer_error: type[Exception]
) -> None:
    for caught_as in (IntegerError, layer_error, ValueError):
        with pytest.raises(caught_as, match="page_size must be an int >= 1, got 0"):
            check_int("page_size", 0, 1, flavour)
