"""One backend chooser for the probes and the divergence detector."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

from canary.backend import choose_backend
from canary.divergence import DivergenceInputError
from canary.probes import ProbeInputError

CPU = torch.device("cpu")


@pytest.mark.parametrize(("package", "error"), [("canary.probes", ProbeInputError), ("canary.divergence", DivergenceInputError)])
def test_each_check_names_a_triton_backend_that_exists(package: str, error: type[Exception]) -> None:
    assert importlib.util.find_spec(f"{package}.triton_backend") is not None
    assert choose_backend("torch", CPU, package, error) is None
    assert choose_backend("auto", CPU, package, error) is None
    with pytest.raises(error, match="impl must be one of"):
        choose_backend("cuda", CPU, package, error)


def test_triton_on_cpu_without_the_interpreter_is_a_typed_error() -> None:
    pytest.importorskip("triton")
    kernels = importlib.import_module("canary.probes.triton_backend")
    if kernels.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1: CPU tensors are allowed")
    with pytest.raises(ProbeInputError, match="needs CUDA tensors"):
        choose_backend("triton", CPU, "canary.probes", ProbeInputError)


def test_triton_without_triton_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "canary.divergence.triton_backend", raising=False)
    with pytest.raises(DivergenceInputError, match="needs the triton package"):
        choose_backend("triton", CPU, "canary.divergence", DivergenceInputError)
    assert choose_backend("auto", torch.device("cuda"), "canary.divergence", DivergenceInputError) is None
