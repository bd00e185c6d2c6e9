"""The error hierarchy shared by the three packages.

Every error a user can cause derives from `MlsaeError`; the CLIs print its message as one line
`Error: <what is wrong> (<how to fix>)`. Subclasses also derive from the matching built-in so callers
can catch `FileNotFoundError` or `ValueError` as usual.
"""

from __future__ import annotations


class MlsaeError(Exception):
    """Base of every error caused by input or environment; the CLI shows it as one line."""

    exit_code: int = 2


class InputError(MlsaeError, ValueError):
    """An option or input value is invalid."""


class NotFoundError(MlsaeError, FileNotFoundError):
    """A model, dataset, file or store does not exist."""


class StoreError(MlsaeError, ValueError):
    """A path is not a store of the expected kind, or holds incompatible data."""


class LockedError(MlsaeError, RuntimeError):
    """Another process is writing to the store."""

    exit_code = 1


class CorruptError(MlsaeError, RuntimeError):
    """A store failed verification."""

    exit_code = 1


class RuntimeFailure(MlsaeError, RuntimeError):
    """The work started but could not finish (numerical overflow, full disk, ...)."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what it left behind said truly for the command that was running (the CLI shows the message)."""
