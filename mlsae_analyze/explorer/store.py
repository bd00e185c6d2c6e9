"""What the explorer's server reads, and how: the index (one latent at a time), example and context windows from
the latents store (the rows of all of a request's windows in one read, each chunk they touch decoded once), and the
tokens' text.

Nothing proportional to the number of tokens is read at start-up or per request: a request reads one latent's
rows of the index and the latents rows of at most `limit` windows (or one context window). The per-latent
columns of the latents table and the overview heatmap (N values each) are read once, on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from mlsae_analyze.example_pages import load_decoder
from mlsae_analyze.explorer.fingerprints import SOURCES, Freshness
from mlsae_analyze.explorer.index import ExplorerIndex, TableColumns
from mlsae_analyze.latents import LatentChunk, Latents
from mlsae_cache.store import TokenRows, read_meta


class Stale(Exception):
    """The stores moved since the index was built: what changed, and the command that rebuilds it."""

    def __init__(self, changed: list[str], rebuild: str) -> None:
        super().__init__("; ".join(changed))
        self.changed, self.rebuild = changed, rebuild


class Window:
    """Rows [start, stop) of the latents store around row `center`, inside its context window."""

    def __init__(self, rows: LatentChunk, center: int, include_untrainable: bool) -> None:
        same = rows.tokens.sequence == rows.tokens.sequence[center - rows.start]
        keep = np.flatnonzero(same)
        self.start, self.stop = rows.start + int(keep[0]), rows.start + int(keep[-1]) + 1
        part = slice(int(keep[0]), int(keep[-1]) + 1)
        self.indices, self.values = rows.indices[part], rows.values[part]
        self.token_ids, self.position = rows.tokens.token_ids[part], rows.tokens.position[part]
        self.sequence = int(rows.tokens.sequence[center - rows.start])
        kept = np.ones(len(self.token_ids), bool) if include_untrainable else rows.tokens.trainable[part]
        self.skipped = np.flatnonzero(~kept)
        self.values = self.values * kept[:, None, None]
        self.focus = center - self.start

    def latent_values(self, j: int) -> np.ndarray:
        """Latent j's activation at every row of the window and every layer: [n, L] float64."""
        return np.where(self.indices == j, self.values, 0.0).sum(-1, dtype=np.float64)


def read_spans(latents: Latents, ranges: list[tuple[int, int]]) -> list[LatentChunk]:
    """The rows of each range [a, b), all read at once (`Latents.take`: zarr decodes each chunk they touch once,
    side by side; in a version 2 store a chunk here is an inner chunk of 64 tokens)."""
    rows = np.unique(np.concatenate([np.arange(a, b) for a, b in ranges]))
    indices, values, tokens = latents.take(rows)
    out = []
    for a, b in ranges:
        part = slice(int(np.searchsorted(rows, a)), int(np.searchsorted(rows, a)) + b - a)
        out.append(LatentChunk(a, indices[part], values[part], TokenRows(*(t[part] for t in tokens))))
    return out


class ExplorerStores:
    """The index and the stores it names (each path overridable), opened for reading."""

    def __init__(self, index: Path, overrides: dict[str, Path | None], model: str | None) -> None:
        self.index = ExplorerIndex(index)
        meta = self.index.meta
        self.paths = {name: Path(overrides.get(name) or meta.sources[name].path) for name in SOURCES}
        self.latents = Latents(self.paths["latents"])
        self.freshness = Freshness({n: s.fingerprint for n, s in meta.sources.items()}, self.paths)
        self.model = model or meta.model
        self.cache_model = read_meta(self.paths["cache"]).model
        decode, self.token_note = load_decoder(
            replace(self.latents.meta, cache_path=str(self.paths["cache"])), self.model
        )
        self.decode: Callable[[int], str] = decode

    def check_fresh(self) -> None:
        """Raise Stale when a store moved since the index was built."""
        changed = self.freshness.changed()
        if changed:
            raise Stale(changed, self.index.meta.rebuild)

    @functools.cached_property
    def table(self) -> TableColumns:
        return self.index.table()

    @functools.cached_property
    def layer_probs(self) -> np.ndarray:
        return self.index.layer_probs()

    @functools.cached_property
    def top_logit_text(self) -> list[str | None]:
        """The text of each latent's most promoted token (None without logit effects)."""
        top = self.table.top_logit
        return [None] * self.index.meta.n_latents if top is None else list(self.text(top))

    @functools.cached_property
    def order(self) -> np.ndarray:
        return self.index.mean_layer_order()

    def windows(self, codes: np.ndarray, context: int) -> list[Window]:
        """The windows of example codes (token * L + layer; no empty ones): `context` rows either side."""
        n_layers, n_tokens = self.index.meta.n_layers, self.latents.n_tokens
        centers = [int(c) // n_layers for c in codes]
        ranges = [(max(0, c - context), min(n_tokens, c + context + 1)) for c in centers]
        rows = read_spans(self.latents, ranges) if ranges else []
        keep_all = self.index.meta.include_untrainable
        return [Window(r, c, keep_all) for r, c in zip(rows, centers, strict=True)]

    def doc_window(self, d: int) -> Window:
        start, stop = self.index.doc_rows(d)
        (rows,) = read_spans(self.latents, [(start, stop)])
        return Window(rows, start, self.index.meta.include_untrainable)

    def text(self, token_ids: np.ndarray) -> list[str]:
        return [self.decode(int(i)) for i in token_ids]
