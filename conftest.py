"""Loads the swa-canary pytest plugin when the project runs from a checkout that is not installed."""

from importlib.metadata import entry_points

if not any(entry.value == "properties.plugin" for entry in entry_points(group="pytest11")):
    pytest_plugins = ["properties.plugin"]
