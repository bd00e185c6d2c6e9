"""`mlsae-cache verify PATH`: recognise which kind of store PATH is from its own marker (a Zarr group's `mlsae`
root attribute, an SAE's or a lens's cfg.json, an output directory's `.mlsae-output`) and hand it to the module
that owns that format, which checks every file of it (`Verified`).

The owners of the later stages live in mlsae_train and mlsae_analyze, which this package must not import (imports
point one way: cache <- train <- analyze), so they are named here as `module:function` and imported only when a
store of theirs is given, as a plugin would be; tests/test_corruption.py checks that each name resolves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from mlsae_cache.core.errors import CorruptError, NotFoundError, StoreError
from mlsae_cache.core.paths import what_is

STORE_VERIFIERS = {
    "mlsae-cache": "mlsae_cache.store:verify_cache",
    "mlsae-latents": "mlsae_analyze.latents:verify_latents",
    "mlsae-explorer-index": "mlsae_analyze.explorer.index:verify_index",
    "mlsae-sae": "mlsae_train.checkpoint:verify_sae",
    "mlsae-lens": "mlsae_train.lens:verify_lens",
    "variance": "mlsae_analyze.results:verify_variance",
}
"""Format of a Zarr group's root attribute or of a cfg.json, or kind of an output directory -> its owner's check."""
OTHER_OUTPUT = "mlsae_cache.core.checksums:verify_output"
"""The check of any other output directory (its marker's manifest)."""
KNOWN = (
    "an mlsae cache or any other store `verify` checks (a latents store, variance output, explorer index, SAE or lens)"
)


@dataclass(frozen=True)
class Verified:
    """What a check found sound: the kind of store, how many `unit`s (chunks, files) it checked, and notes on what
    it could not check (files written before checksums were recorded)."""

    kind: str
    checked: int
    unit: str
    notes: tuple[str, ...] = ()


def _json(path: Path) -> Any:
    """The JSON in `path`; CorruptError naming it when it cannot be read (it marks a store: it was written by us)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptError(f"{path} is unreadable ({e}): the store is damaged (re-create it)") from e


def _kind(path: Path) -> str | None:
    """The key of STORE_VERIFIERS for `path`, OTHER_OUTPUT for another output directory, None for anything else."""
    if (path / "zarr.json").is_file():
        group = _json(path / "zarr.json")
        attrs = group.get("attributes") if isinstance(group, dict) else None
        record = attrs.get("mlsae") if isinstance(attrs, dict) else None
        if not isinstance(record, dict):
            raise StoreError(f"{path} is a Zarr group but not an mlsae store (no 'mlsae' attribute; {KNOWN})")
        return str(record.get("format"))
    if (path / "cfg.json").is_file():
        cfg = _json(path / "cfg.json")
        return str(cfg.get("format")) if isinstance(cfg, dict) else None
    from mlsae_cache.core.outputs import MARKER

    if (path / MARKER).is_file():
        marker = _json(path / MARKER)
        kind = marker.get("kind") if isinstance(marker, dict) else None
        return kind if kind in STORE_VERIFIERS else OTHER_OUTPUT
    return None


def verifier(name: str) -> Callable[[Path], Verified]:
    """The function a `module:function` name of STORE_VERIFIERS names."""
    module, function = name.split(":")
    return getattr(import_module(module), function)  # type: ignore[no-any-return]


def verify_path(path: Path | str) -> Verified:
    """Check every file of the store at `path`, whatever its kind; CorruptError (exit 1) naming the first damaged
    file, NotFoundError / StoreError for a path that is no store this mlsae knows."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist (give the path of a store to check)")
    if not path.is_dir():
        raise StoreError(f"{path} is a file, not {KNOWN}")
    kind = _kind(path)
    if kind == OTHER_OUTPUT:
        return verifier(OTHER_OUTPUT)(path)
    if kind not in STORE_VERIFIERS:
        found = what_is(path) if kind is None else f"a store of format {kind!r}"
        raise StoreError(f"{path} is {found}, not {KNOWN}")
    return verifier(STORE_VERIFIERS[kind])(path)
