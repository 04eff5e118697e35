"""The pytest plugin changes nothing for a project's own tests: a user project with its own
Hypothesis profile, run by pytest in a subprocess with our plugin installed (its entry point),
keeps its profile and never imports torch; the machines it imports still run under ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from properties.settings import PROFILES

INSTALLED = any(entry.name == "swa_canary" for entry in entry_points(group="pytest11"))
pytestmark = pytest.mark.skipif(not INSTALLED, reason="swa-canary is not installed (no pytest11 entry point)")

USER_CONFTEST = """
import json, os
from hypothesis import settings

settings.register_profile("mine", max_examples=7)
settings.load_profile("mine")
BUILT = []

def pytest_sessionfinish(session):
    with open(os.path.join(os.path.dirname(__file__), "built.json"), "w") as out:
        json.dump(len(BUILT), out)
"""

# What the project's own tests see, written down for the test to compare.
USER_TESTS = """
import json, os, sys
from hypothesis import given, settings, strategies as st

RUNS = []

@given(st.integers())
def test_given_runs_under_the_project_profile(value):
    RUNS.append(value)

def test_write_what_the_project_saw(pytestconfig):
    seen = {
        "plugin": pytestconfig.pluginmanager.hasplugin("swa_canary"),
        "profile": settings.get_current_profile_name(),
        "settings": repr(settings()).replace(os.path.dirname(__file__), "PROJECT"),
        "runs": len(RUNS),
        "torch": "torch" in sys.modules,
        "machines": "properties.machines" in sys.modules,
    }
    with open(os.path.join(os.path.dirname(__file__), "seen.json"), "w") as out:
        json.dump(seen, out)
"""

# A target that counts the allocators it builds: one per program the machine runs.
USER_TARGET = """
import conftest
from properties.targets import as_target

def make(config):
    conftest.BUILT.append(1)
    return as_target("reference").factory(config)
"""


def user_project(root: Path, *, with_machines: bool = False) -> Path:
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n" + ("swa_target = counting:make\n" if with_machines else ""))
    (root / "conftest.py").write_text(USER_CONFTEST)
    (root / "test_user.py").write_text(USER_TESTS)
    if with_machines:
        (root / "counting.py").write_text(USER_TARGET)
        (root / "test_swa.py").write_text("from properties.suite import *  # noqa: F401,F403\n")
    return root


def run_pytest(root: Path, *args: str) -> dict:
    """Run pytest in the project; returns what its tests saw."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "HYPOTHESIS", "SWA_"))}
    env.pop("CI", None)
    env["PYTHONPATH"] = str(root)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root), *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return json.loads((root / "seen.json").read_text())


def test_a_project_keeps_its_own_profile_and_imports_no_torch(tmp_path: Path) -> None:
    seen = run_pytest(user_project(tmp_path / "project"))
    assert seen["plugin"] and seen["profile"] == "mine" and seen["runs"] == 7
    assert not seen["torch"] and not seen["machines"]


@pytest.mark.parametrize("option", [[], ["--hypothesis-profile=ci"]])
def test_a_project_sees_what_it_sees_without_the_plugin(tmp_path: Path, option: list[str]) -> None:
    """`ci` is also Hypothesis's own profile: the option loads it for the project, as it would
    without us."""
    with_plugin = run_pytest(user_project(tmp_path / "with"), *option)
    without = run_pytest(user_project(tmp_path / "without"), "-p", "no:swa_canary", *option)
    assert with_plugin["plugin"] and not without["plugin"]
    assert {**with_plugin, "plugin": None} == {**without, "plugin": None}


def test_naming_only_our_profile_changes_nothing_for_the_project(tmp_path: Path) -> None:
    """The project registered no `nightly`: the option picks ours for the machines, and the
    project's tests keep the profile they had."""
    seen = run_pytest(user_project(tmp_path / "project"), "--hypothesis-profile=nightly")
    assert seen["runs"] == 7 and seen["settings"] == run_pytest(user_project(tmp_path / "plain"))["settings"]


@pytest.mark.parametrize("profile", ["ci", None])
def test_the_machines_of_a_project_run_under_our_profile(tmp_path: Path, profile: str | None) -> None:
    root = user_project(tmp_path / "project", with_machines=True)
    seen = run_pytest(root, "-k", "SlotMachine or user", *([f"--hypothesis-profile={profile}"] if profile else []))
    assert seen["runs"] == 7 or profile == "ci"  # --hypothesis-profile=ci is Hypothesis's own for the project
    built = int((root / "built.json").read_text())
    # Our `dev` (the default off CI) runs 60 programs, `ci` 40; the project's profile would run 7.
    assert built >= PROFILES[profile or "dev"].max_examples, built
