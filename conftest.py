"""This repository's own tests: the swa-canary pytest plugin when the project runs from a
checkout that is not installed, and our Hypothesis profiles for every test here (the plugin
gives them to the machines only, leaving other projects' tests alone)."""

from importlib.metadata import entry_points

from properties.settings import register_profiles

if not any(entry.value == "properties.plugin" for entry in entry_points(group="pytest11")):
    pytest_plugins = ["properties.plugin"]

register_profiles()
