"""A target module that fails as it is imported."""

raise RuntimeError("this module cannot be imported")
