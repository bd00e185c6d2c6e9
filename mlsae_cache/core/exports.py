"""Lazy package exports (PEP 562): a package lists its public names and the submodule of each, and each is imported
on first use, so importing the package itself loads nothing heavy (torch, zarr, FastAPI)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package` (its `__name__`), where `exports` maps each public
    name to the module that defines it; a name found once is then set on the package, so later lookups are direct."""
    module = sys.modules[package]

    def get(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name]), name)
        setattr(module, name, value)
        return value

    def listing() -> list[str]:
        return sorted({*vars(module), *exports})

    return get, listing
