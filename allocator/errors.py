"""The allocator's exceptions: one small hierarchy, so callers can catch all of them at once.

Every error is raised before any state is touched, so a rejected call leaves the allocator
exactly as it was.
"""

from __future__ import annotations


class IntegerError(ValueError):
    """A value that must be a Python int (a bool is not one) of at least some bound is not.

    Raised only by `allocator.validation.check_int`. Each layer's flavour subclasses this and
    its own error type (`ConfigIntegerError` is an `InvalidConfigError` too), so a caller can
    catch either.
    """


class AllocatorError(Exception):
    """Base class of every error the allocator raises on bad input or misuse."""


class InvalidConfigError(AllocatorError, ValueError):
    """The constructor was given sizes or a page size it cannot work with."""


class InvalidIndexError(AllocatorError, ValueError):
    """An index tensor has the wrong dtype, device or shape, or holds out-of-range values."""


class ContiguityError(AllocatorError, ValueError):
    """An extension does not continue the request's last page: (last_loc + 1) % ps != prefix % ps."""


class DoubleFreeError(AllocatorError, ValueError):
    """Checked mode: a free names a slot that is not allocated, or names it twice."""


class FreeGroupError(AllocatorError, RuntimeError):
    """A free group was nested, ended without being begun, or state was saved inside one."""


class UnsupportedOperationError(AllocatorError, RuntimeError):
    """The call does not exist at this page size (for example token `alloc` with pages)."""


class InvalidStateError(AllocatorError, ValueError):
    """`restore_state` was given something that is not a state of this allocator."""


class SWAPeerHeldError(AllocatorError, ValueError):
    """Checked mode: `free_full` names a full slot whose SWA peer is still allocated."""


class ConfigIntegerError(IntegerError, InvalidConfigError):
    """A size or page size given to a constructor is not an int of at least its bound."""


class IndexIntegerError(IntegerError, InvalidIndexError):
    """A count given to a call is not an int of at least 0."""
