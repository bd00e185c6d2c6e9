"""The shared fixtures of the training tests live in tests/conftest.py; `import_npy` stays importable from here."""

from __future__ import annotations

from tests.conftest import import_npy

__all__ = ["import_npy"]
