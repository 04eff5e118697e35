"""The torch-free names every --help lists are the registries' own, and --help imports no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from canary.simulate import INJECTIONS
from properties import names
from properties.machines import MACHINES
from properties.targets import RESTRICTIONS
from properties.targets.mutants import MUTANTS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "listed, registry",
    [
        (names.RESTRICTIONS, RESTRICTIONS),
        (names.MACHINES, MACHINES),
        (names.MUTANTS, MUTANTS),
        (names.INJECTIONS, INJECTIONS),
    ],
    ids=["restrictions", "machines", "mutants", "injections"],
)
def test_the_listed_names_are_the_registry(listed: tuple[str, ...], registry: object) -> None:
    assert list(listed) == sorted(registry), "update properties/names.py to the registry"


@pytest.mark.parametrize("command", ["check", "fuzz", "simulate", "selfcheck", "replay"])
def test_every_help_lists_the_names_without_importing_torch(command: str) -> None:
    code = (
        "import sys\n"
        "from properties.cli import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.stdout.strip().endswith("NO-TORCH"), completed.stdout[-500:]
    shown = {"check": names.RESTRICTIONS, "fuzz": names.MACHINES, "simulate": names.INJECTIONS,
             "selfcheck": names.MUTANTS, "replay": ()}[command]
    assert all(name in completed.stdout for name in shown)
