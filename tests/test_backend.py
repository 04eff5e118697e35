"""One backend chooser for the probes and the divergence detector."""

from __future__ import annotations

import importlib
import importlib.util
from types import SimpleNamespace

import pytest
import torch

import canary.backend
from canary.backend import choose_backend
from canary.divergence import DivergenceInputError
from canary.probes import ProbeInputError

CPU = torch.device("cpu")


CHECKS = [("canary.probes", ProbeInputError), ("canary.divergence", DivergenceInputError)]


@pytest.mark.parametrize(("package", "error"), CHECKS)
def test_each_check_names_a_triton_backend_that_exists(package: str, error: type[Exception]) -> None:
    assert importlib.util.find_spec(f"{package}.triton_backend") is not None
    assert choose_backend("torch", CPU, package, error) is None
    assert choose_backend("auto", CPU, package, error) is None
    with pytest.raises(error, match="impl must be one of"):
        choose_backend("cuda", CPU, package, error)


@pytest.mark.parametrize("interpreted", [False, True])
def test_triton_runs_on_cpu_only_interpreted_and_never_by_default(
    monkeypatch: pytest.MonkeyPatch, interpreted: bool
) -> None:
    # A stand-in backend module: importing the real one here would build its kernels in one
    # mode for the whole process (tests/test_divergence.py's triton_ready fixture says why).
    kernels = SimpleNamespace(INTERPRETED=interpreted)
    monkeypatch.setattr(canary.backend, "importlib", SimpleNamespace(import_module=lambda name: kernels))
    chosen = choose_backend("auto", torch.device("cuda"), "canary.probes", ProbeInputError)
    assert chosen is (None if interpreted else kernels)
    if interpreted:
        assert choose_backend("triton", CPU, "canary.probes", ProbeInputError) is kernels
    else:
        with pytest.raises(ProbeInputError, match="needs CUDA tensors"):
            choose_backend("triton", CPU, "canary.probes", ProbeInputError)


def test_triton_without_triton_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_triton(name: str) -> None:
        raise ModuleNotFoundError("No module named 'triton'")

    monkeypatch.setattr(canary.backend, "importlib", SimpleNamespace(import_module=no_triton))
    with pytest.raises(DivergenceInputError, match="needs the triton package"):
        choose_backend("triton", CPU, "canary.divergence", DivergenceInputError)
    assert choose_backend("auto", torch.device("cuda"), "canary.divergence", DivergenceInputError) is None
