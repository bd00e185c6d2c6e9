"""Max-activating examples: for each selected latent and layer, the tokens where it fires hardest.

Streaming passes over the latents store, one token chunk at a time, never holding anything of size
tokens x n_latents: pass 1 sums each latent's activation per layer (`totals` [L, n_latents], to select latents
and describe them); pass 2 keeps, for the selected latents only, a running top-N per (layer, latent) (`topn.TopN`);
pass 3 reads the chunks that hold the examples' contexts again, for the latent's activation at every context
token. Latents are selected by id, as the `top` with most activation mass, or at `random` among those that fire,
optionally only those whose mean layer lies in a range. Rows with `trainable == False` are skipped unless asked.
Ties are broken by token order (the earlier token ranks first). Contexts are the `context` tokens either side of
the example that lie in the same window (equal `sequence`). example_pages.py writes them as pages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mlsae_analyze.latents import Latents, check_rows
from mlsae_analyze.layers import layer_distribution, layer_totals
from mlsae_analyze.topn import EMPTY, TopN
from mlsae_cache.core.errors import InputError
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.store import TokenRows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExamplesConfig:
    """Everything `mlsae-analyze examples` takes; CLI options map one-to-one onto these fields.

    Which latents: `latent_ids`, the `top` N with most activation mass, or `random` N of those that fire (seeded
    by `seed`); with none of the three, the top 10. `mean_layer` (block indices "a-b") keeps only latents whose mean
    layer lies in that range. `per_layer` examples per (latent, layer), `context` tokens either side; `model`
    decodes tokens with that model's tokenizer instead of the cache's.
    """

    latents: Path
    out: Path
    top: int | None = None
    random: int | None = None
    latent_ids: tuple[int, ...] | None = None
    mean_layer: str | None = None
    seed: int = 0
    per_layer: int = 5
    context: int = 4
    include_untrainable: bool = False
    model: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name, low in (("top", 1), ("random", 1), ("per_layer", 1), ("context", 0)):
            value = getattr(self, name)
            if value is None and name in ("top", "random"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag} must be an integer >= {low}, got {value!r}")
        if self.latent_ids is not None and not self.latent_ids:
            raise InputError("--latents is empty (give latent ids like 3,17)")
        chosen = [f for f, v in (("--top", self.top), ("--random", self.random), ("--latents", self.latent_ids)) if v]
        if len(chosen) > 1:
            raise InputError(f"give one of --top, --random and --latents, not {' and '.join(chosen)}")
        if self.mean_layer is not None:
            self.layer_range()

    def layer_range(self) -> tuple[float, float] | None:
        """`mean_layer` as (low, high) block indices, or None."""
        if self.mean_layer is None:
            return None
        low, dash, high = self.mean_layer.partition("-")
        try:
            bounds = (float(low), float(high)) if dash else (float(low), float(low))
        except ValueError:
            bounds = (1.0, 0.0)
        if bounds[0] > bounds[1]:
            raise InputError(f"--mean-layer {self.mean_layer!r} is not a range of blocks like 20-29")
        return bounds


@dataclass(frozen=True)
class Example:
    """One example: `latent` fires with `activation` at layer position `layer` on store row `token`.

    context: token ids of the window around it, `focus` the example's index in it; context_values: the latent's
    activation at each of them, at the same layer.
    """

    latent: int
    layer: int
    rank: int
    activation: float
    token: int
    sequence: int
    position: int
    context: tuple[int, ...]
    focus: int
    context_values: tuple[float, ...] = ()


@dataclass(frozen=True)
class LatentSummary:
    """A selected latent: its activation mass per layer position [L] and its examples."""

    latent: int
    totals: np.ndarray
    examples: tuple[Example, ...]

    @property
    def mass(self) -> float:
        return float(self.totals.sum())

    @property
    def mean_layer(self) -> float:
        """E[L|j] in layer positions (NaN if the latent never fires)."""
        return float(layer_distribution(self.totals[:, None]).mean[0])


def _chunks(
    latents: Latents, include_untrainable: bool, progress: Progress
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, indices [C, L, k], values [C, L, k] float64) per token chunk; dropped rows get value 0 and
    inactive slots index 0."""
    for chunk in latents.chunks(progress):
        values = chunk.values.astype(np.float64)
        check_rows(chunk.indices, values, latents.n_latents)
        if not include_untrainable:
            values = values * chunk.tokens.trainable[:, None, None]
        yield chunk.start, np.where(values > 0, chunk.indices, 0), values


def latent_totals(latents: Latents, include_untrainable: bool = False, progress: Progress = no_progress) -> np.ndarray:
    """Pass 1: totals[l, j] = sum_t a[l, t, j] over kept rows, shape [L, n_latents] float64."""
    totals = np.zeros((len(latents.layers), latents.n_latents))
    for _, indices, values in _chunks(latents, include_untrainable, progress):
        totals += layer_totals(indices, values, latents.n_latents)[0]
    return totals


def parse_latent_ids(text: str) -> tuple[int, ...]:
    """'3,17' -> (3, 17); InputError for anything else."""
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--latents {text!r} is not a comma-separated list of latent ids (like 3,17)") from None
    if len(set(ids)) != len(ids):
        raise InputError(f"--latents {text!r} names a latent twice (list each once)")
    return ids


def select_latents(totals: np.ndarray, cfg: ExamplesConfig, layers: tuple[int, ...]) -> np.ndarray:
    """The latent ids to show (see ExamplesConfig); only latents that fire, except ids given by hand."""
    n_latents = totals.shape[1]
    if cfg.latent_ids is not None:
        bad = [j for j in cfg.latent_ids if not 0 <= j < n_latents]
        if bad:
            raise InputError(f"--latents {bad} out of range: this SAE has latents 0..{n_latents - 1}")
        return np.asarray(cfg.latent_ids, dtype=np.int64)
    mass = totals.sum(axis=0)
    candidates = mass > 0
    bounds = cfg.layer_range()
    if bounds is not None:
        mean = np.interp(layer_distribution(totals[:, candidates]).mean, np.arange(len(layers)), layers)
        keep = (mean >= bounds[0]) & (mean <= bounds[1])
        candidates[np.flatnonzero(candidates)[~keep]] = False
        if not candidates.any():
            raise InputError(f"no latent that fires has its mean layer in {cfg.mean_layer} (widen --mean-layer)")
    if cfg.random is not None:
        pool = np.flatnonzero(candidates)
        picked = np.random.default_rng(cfg.seed).choice(pool, min(cfg.random, len(pool)), replace=False)
        return np.sort(picked)
    order = np.argsort(-np.where(candidates, mass, -1.0), kind="stable")[: cfg.top or DEFAULT_TOP]
    return order[candidates[order]]


DEFAULT_TOP = 10


class TopRows(NamedTuple):
    """The top activations of each (layer, tracked latent): values [L, m, n] (descending, -inf = empty) and the
    store rows [L, m, n] (topn.EMPTY = empty)."""

    values: np.ndarray
    rows: np.ndarray


def top_activations(
    latents: Latents, selected: np.ndarray, cfg: ExamplesConfig, progress: Progress = no_progress
) -> TopRows:
    """Pass 2: the top cfg.per_layer rows of each (layer, selected latent); slot i is latent selected[i]. Rows
    come in order, so ties go to the earlier row."""
    slot_of = np.full(latents.n_latents, -1, dtype=np.int64)
    slot_of[selected] = np.arange(len(selected))
    n_layers, m = len(latents.layers), len(selected)
    top = TopN(n_layers * m, cfg.per_layer)  # group layer * m + slot
    k = latents.meta.k
    for start, indices, values in _chunks(latents, cfg.include_untrainable, progress):
        row = start + np.repeat(np.arange(indices.shape[0]), k)
        for layer in range(indices.shape[1]):
            slot, value = slot_of[indices[:, layer].ravel()], values[:, layer].ravel()
            hit = (slot >= 0) & (value > 0)
            top.offer(layer * m + slot[hit], value[hit], row[hit])
    values, rows = top.result()
    return TopRows(values.reshape(n_layers, m, -1), rows.reshape(n_layers, m, -1))


def _context(row: int, sequence: np.ndarray, token_ids: np.ndarray, width: int) -> tuple[tuple[int, ...], int]:
    """Token ids within `width` of `row` in the same window, and the row's index in them."""
    lo, hi = max(0, row - width), min(len(sequence), row + width + 1)
    same = np.flatnonzero(sequence[lo:hi] == sequence[row]) + lo  # windows are contiguous runs
    return tuple(int(t) for t in token_ids[same]), int(row - same[0])


def _latent_examples(top: TopRows, slot: int, latent: int, tokens: TokenRows, width: int) -> list[Example]:
    """The filled top-n entries of one tracked latent at every layer, as Examples with their contexts."""
    sequence, token_ids, position = tokens.sequence, tokens.token_ids, tokens.position
    examples = []
    for layer in range(top.rows.shape[0]):
        rows, values = top.rows[layer, slot], top.values[layer, slot]
        for rank in np.flatnonzero(rows != EMPTY):
            row = int(rows[rank])
            context, focus = _context(row, sequence, token_ids, width)
            examples.append(
                Example(
                    latent=latent,
                    layer=layer,
                    rank=int(rank),
                    activation=float(values[rank]),
                    token=row,
                    sequence=int(sequence[row]),
                    position=int(position[row]),
                    context=context,
                    focus=focus,
                )
            )
    return examples


def find_examples(latents: Latents, cfg: ExamplesConfig, progress: Progress = no_progress) -> tuple[LatentSummary, ...]:
    """The selected latents with their top examples per layer (definitions: module docstring).

    The token arrays are read whole (a few bytes per token). `progress` is called with the tokens of each chunk
    read, twice over the store (2 * n_tokens in all).
    """
    totals = latent_totals(latents, cfg.include_untrainable, progress)
    selected = select_latents(totals, cfg, latents.layers)
    top = top_activations(latents, selected, cfg, progress)
    tokens = latents.tokens()
    found = [_latent_examples(top, slot, int(j), tokens, cfg.context) for slot, j in enumerate(selected)]
    with_values = iter(context_activations(latents, [e for examples in found for e in examples]))
    return tuple(
        LatentSummary(int(j), totals[:, j].copy(), tuple(next(with_values) for _ in examples))
        for j, examples in zip(selected, found, strict=True)
    )


def context_activations(latents: Latents, examples: list[Example]) -> list[Example]:
    """Pass 3: each example with its latent's activation at every context token (at its layer), reading once
    each stored chunk that holds a context token."""
    rows = [np.arange(e.token - e.focus, e.token - e.focus + len(e.context)) for e in examples]
    values = [np.zeros(len(r)) for r in rows]
    if not examples:
        return []
    all_rows = np.concatenate(rows)
    owner = np.repeat(np.arange(len(examples)), [len(r) for r in rows])
    offset = np.concatenate([np.arange(len(r)) for r in rows])
    ct = latents.chunk_tokens
    for start in np.unique(all_rows // ct) * ct:
        chunk = latents.chunk(int(start))
        here = (all_rows >= start) & (all_rows < start + len(chunk.indices))
        for i, r, o in zip(owner[here], all_rows[here] - start, offset[here], strict=True):
            e = examples[i]
            slots = chunk.indices[r, e.layer] == e.latent
            values[i][o] = float(chunk.values[r, e.layer][slots].sum())
    return [replace(e, context_values=tuple(v.tolist())) for e, v in zip(examples, values, strict=True)]
