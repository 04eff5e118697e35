"""The state machines against the target the plugin selects (the reference by default)."""

from properties.suite import *  # noqa: F401,F403
