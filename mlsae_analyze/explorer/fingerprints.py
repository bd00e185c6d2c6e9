"""Fingerprints of the four stores an explorer index is built from, and the check that they have not moved since.

latents: its metadata (SAE and cache fingerprints, rows, completeness); variance: its summary (which names the
latents it was computed from and holds its results); sae: its weights (the fingerprint `encode` records); cache:
its fingerprint and rows. Each is read from one file, and `Freshness` computes it again only when that file's size
or modification time changes, so a server can check on every request for the cost of four `stat` calls.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from mlsae_analyze.latents import read_latents_meta
from mlsae_analyze.results import SUMMARY_JSON, VarianceSummary
from mlsae_cache.core.errors import MlsaeError
from mlsae_cache.store import read_meta

SOURCES = ("latents", "variance", "sae", "cache")
"""The stores an index is built from, in the order errors name them."""


def _digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def latents_fingerprint(path: Path) -> str:
    m = read_latents_meta(path)
    fields = [m.sae_fingerprint, m.cache_fingerprint, m.n_tokens, m.complete, list(m.layers), m.k, m.n_latents]
    return _digest(json.dumps(fields))


def variance_fingerprint(path: Path) -> str:
    summary = VarianceSummary.read(Path(path) / SUMMARY_JSON)
    return _digest(json.dumps(summary.to_dict(), sort_keys=True))


def sae_fingerprint(path: Path) -> str:
    from mlsae_analyze.encode import sae_fingerprint as weights_fingerprint

    return weights_fingerprint(path)


def cache_fingerprint(path: Path) -> str:
    meta = read_meta(path)
    return _digest(json.dumps([meta.fingerprint, meta.n_tokens, meta.complete]))


def _weights_file(path: Path) -> Path:
    from mlsae_train.checkpoint import WEIGHTS_NAME

    return path / WEIGHTS_NAME


FINGERPRINTS: dict[str, tuple[Callable[[Path], str], Callable[[Path], Path]]] = {
    "latents": (latents_fingerprint, lambda p: p / "zarr.json"),
    "variance": (variance_fingerprint, lambda p: p / SUMMARY_JSON),
    "sae": (sae_fingerprint, _weights_file),
    "cache": (cache_fingerprint, lambda p: p / "zarr.json"),
}
"""Source name -> (its fingerprint, the file it is computed from)."""


def fingerprint(name: str, path: Path) -> str:
    return FINGERPRINTS[name][0](Path(path))


class Freshness:
    """Whether the stores at `paths` still have the fingerprints `recorded` (source name -> fingerprint)."""

    def __init__(self, recorded: dict[str, str], paths: dict[str, Path]) -> None:
        self.recorded, self.paths = recorded, paths
        self._seen: dict[str, tuple[tuple[int, int, int], str]] = {}

    def _current(self, name: str) -> str | None:
        compute, file_of = FINGERPRINTS[name]
        path = Path(self.paths[name])
        try:
            st = os.stat(file_of(path))
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if name not in self._seen or self._seen[name][0] != key:
            try:
                self._seen[name] = (key, compute(path))
            except (MlsaeError, OSError, ValueError):
                return None
        return self._seen[name][1]

    def changed(self) -> list[str]:
        """One phrase per store that moved: '<name> <path> is missing or unreadable' or '... changed since the index
        was built'."""
        out = []
        for name in SOURCES:
            current = self._current(name)
            if current is None:
                out.append(f"{name} {self.paths[name]} is missing or unreadable")
            elif current != self.recorded[name]:
                out.append(f"{name} {self.paths[name]} changed since the index was built")
        return out
