"""Where latents fire over layers, and how much of that spread is per token (docs/METHOD.md, "Analyses").

Input: latents (a `Latents` store, `LatentArrays`, or an xarray Dataset of the format's variables), read lazily
with any chunking along `token`. Notation: a[l, t, j] >= 0 is latent j's activation at layer l and token t,
built from the sparse slots (an inactive slot has value 0 whatever index it carries; two active slots of one
(token, layer) row with the same index would be summed). Layers are indexed by **position** in the store,
l = 0..L-1, in every mode, whatever block indices they hold; the block indices are only copied to the output.
Tokens with `trainable == False` are dropped first unless `include_untrainable`; every statistic then sees the
kept tokens only.

Pooled mode (the summary's top level): (L, T, J) is random with p(l, t, j) = a[l, t, j] / W, W = sum a.
- var_total = Var(L); var_within_latent = E_J[Var(L|J)] = sum_j p(j) Var[L|j];
  var_within_token = E_{T,J}[Var(L|T,J)] = sum_{t,j} p(t, j) Var(L|t, j);
  rel_var_latent = var_within_latent / var_total; rel_var_token = var_within_token / var_within_latent.
- mean_layer_std: unweighted mean of layer_std = sqrt(Var[L|j]) over active latents (sum_l counts > 0);
  frac_multi_layer: fraction of active latents with n_layers_active > 1; n_rows: kept tokens * L.

Per-window modes (summary["reference"], the reference code's computation, and summary["window"], the same with
normalised mixtures): windows.py. Multi-layer activity (summary["multi_layer"]): the fraction of active latents
with at least two layers that count, for a layer counting when it holds at least a share s of the latent's
activation mass (MULTI_LAYER_SHARES) or at least r rows (MULTI_LAYER_ROWS).

`layer_offset` labels the layers l + offset instead of l: every pooled and window statistic is unchanged by it,
the reference mode is not (tests/analyze/test_variance.py shows both).

Graph: one task per token chunk (`_chunk_task`: it reads its own rows, from the latents store's path or through a
nested synchronous compute of its blocks' reads, so no block travels between processes, then `_chunk_partial`
reduces them to a `_Partial` of a few [L, n_latents] arrays), combined in token order by a tree of `_combine` tasks
(`SPLIT_EVERY` at a time), then `_finalize`; built with dask's public API alone (`Array.to_delayed`,
`dask.delayed`, `dask.compute`). Nothing of size tokens * n_latents exists: per-(token, latent) sums go through a
[batch_tokens, n_latents] scratch. `np.bincount` holds the GIL, so the threaded scheduler runs about one core: use
"processes" or a dask.distributed cluster to use several.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed, delayed

from mlsae_analyze.latents import LatentArrays, Latents, latent_arrays
from mlsae_analyze.layers import layer_distribution, layer_totals
from mlsae_analyze.results import VarianceOutput, VarianceSummary, variance_dataset
from mlsae_analyze.windows import RefPartial, empty_done, ratio, ref_merge, token_batch, window_summaries
from mlsae_cache.core.errors import InputError, StoreError

SPLIT_EVERY = 8
"""Partials combined per tree node."""

DEFAULT_CHUNK_TOKENS = 8192
"""Token chunk used when the input arrays are not dask-backed."""


@dataclasses.dataclass(frozen=True)
class VarianceParams:
    """What the variance analysis computes.

    `min_count`: rows for a layer to count as active for a latent (n_layers_active, frac_multi_layer);
    `scratch_entries` bounds the dense (token, latent) scratch of one token batch: a batch holds
    max(1, scratch_entries // n_latents) tokens (memory ~ 5 * 8 * scratch_entries bytes per worker thread).
    """

    n_latents: int
    min_count: int = 1
    include_untrainable: bool = False
    scratch_entries: int = 2**18
    layer_offset: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n_latents", "min_count", "scratch_entries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r} (pass an integer >= 1)")

    @property
    def batch_tokens(self) -> int:
        """Tokens per dense scratch batch."""
        return max(1, self.scratch_entries // self.n_latents)


@dataclasses.dataclass(frozen=True)
class _Partial:
    """Additive statistics of a contiguous token range.

    totals: [L, n] sum_t a; counts: [L, n] #t with a > 0; within_token: sum_{t,j} sum_l a (l - E[L|t,j])^2.
    """

    totals: np.ndarray
    counts: np.ndarray
    n_tokens: int
    n_seen: int
    within_token: float
    ref: RefPartial


def _check_block(indices: np.ndarray, values: np.ndarray, n_latents: int) -> None:
    """Reject values that are not post-ReLU and active slots whose latent index is out of range."""
    if values.size == 0:
        return
    if not np.isfinite(values).all() or values.min() < 0:
        bad = values[~(np.isfinite(values) & (values >= 0))][0]
        raise StoreError(f"latents `values` hold {bad!r}; they must be finite and >= 0 (re-encode the store)")
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n_latents:
        bad = lo if lo < 0 else hi
        raise StoreError(
            f"latents `indices` hold latent {bad} at an active slot, outside [0, {n_latents}) "
            "(pass the n_latents of the SAE that wrote the store)"
        )


def _chunk_partial(
    indices: np.ndarray, values: np.ndarray, trainable: np.ndarray, sequence: np.ndarray, params: VarianceParams
) -> _Partial:
    """Partial sums of one token chunk: indices, values [C, L, k]; trainable, sequence [C]."""
    n_seen, n = len(trainable), params.n_latents
    if not params.include_untrainable:
        keep = np.asarray(trainable, dtype=bool)
        indices, values, sequence = indices[keep], values[keep], sequence[keep]
    indices = np.where(values > 0, indices, 0)
    _check_block(indices, values, n)
    totals, counts = layer_totals(indices, values, n)
    n_tok = len(indices)
    within, windows = 0.0, []
    for start in range(0, n_tok, params.batch_tokens):
        batch = slice(start, start + params.batch_tokens)
        part_within, part_windows = token_batch(indices[batch], values[batch], sequence[batch], n, params.layer_offset)
        within += part_within
        windows.extend(part_windows)
    ref = ref_merge(windows, empty_done(), n)
    return _Partial(totals, counts, n_tok, n_seen, within, ref)


def _combine(parts: list[_Partial], params: VarianceParams) -> _Partial:
    """Merge partials of consecutive token ranges, given in token order."""
    windows = [w for p in parts for w in p.ref.edges]
    done = np.sum([p.ref.done for p in parts], axis=0)
    return _Partial(
        totals=np.sum([p.totals for p in parts], axis=0),
        counts=np.sum([p.counts for p in parts], axis=0),
        n_tokens=sum(p.n_tokens for p in parts),
        n_seen=sum(p.n_seen for p in parts),
        within_token=float(sum(p.within_token for p in parts)),
        ref=ref_merge(windows, done, params.n_latents),
    )


class _Decomposition(TypedDict):
    var_total: float
    var_within_latent: float
    var_within_token: float
    rel_var_latent: float
    rel_var_token: float


def _decomposition(totals: np.ndarray, layer_var: np.ndarray, within_token: float, offset: float) -> _Decomposition:
    """Law of total variance under p(l, t, j) = a[l, t, j] / W.

    var_total = Var(L) = sum_l p(l) (l - E[L])^2; var_within_latent = E_J[Var(L|J)] = sum_j p(j) Var[L|j];
    var_within_token = E_{T,J}[Var(L|T,J)] = sum_{t,j} sum_l a (l - E[L|t,j])^2 / W.
    """
    weight = totals.sum()
    p_layer = totals.sum(1) / weight
    layer = np.arange(len(p_layer), dtype=np.float64) + offset
    var_total = float((p_layer * (layer - p_layer @ layer) ** 2).sum())
    active = totals.sum(0) > 0
    p_latent = totals.sum(0)[active] / weight
    var_within_latent = float(p_latent @ layer_var[active])
    var_within_token = float(within_token / weight)
    return {
        "var_total": var_total,
        "var_within_latent": var_within_latent,
        "var_within_token": var_within_token,
        "rel_var_latent": ratio(var_within_latent, var_total),
        "rel_var_token": ratio(var_within_token, var_within_latent),
    }


def _check_rows(part: _Partial) -> None:
    if part.n_seen == 0:
        raise InputError("no rows to analyse: the latents Dataset holds 0 tokens (encode some text first)")
    if part.n_tokens == 0:
        raise InputError(
            f"no rows to analyse: 0 of {part.n_seen} tokens are trainable "
            "(pass include_untrainable=True to use every row, or check the latents store)"
        )
    if not part.totals.any():
        raise InputError(
            f"no active latents: every value is 0 in {part.n_tokens} tokens "
            "(check that the latents store was encoded with a trained SAE)"
        )


def _finalize(part: _Partial, params: VarianceParams, layers: tuple[int, ...]) -> VarianceOutput:
    """The output Dataset and the summary (without the provenance that `run_variance` adds)."""
    _check_rows(part)
    dist = layer_distribution(part.totals)
    n_active = (part.counts >= params.min_count).sum(0).astype(np.int64)
    active = part.totals.sum(0) > 0
    attrs = {"min_count": params.min_count, "include_untrainable": params.include_untrainable}
    modes = window_summaries(part.ref, params.n_latents)
    summary = VarianceSummary(
        **_decomposition(part.totals, dist.var, part.within_token, params.layer_offset),
        mean_layer_std=float(dist.std[active].mean()),
        frac_multi_layer=float((n_active[active] > 1).mean()),
        n_rows=part.n_tokens * part.totals.shape[0],
        reference=modes["reference"],
        window=modes["window"],
        multi_layer=multi_layer_curve(part.totals, part.counts),
        min_count=params.min_count,
        include_untrainable=params.include_untrainable,
    )
    return VarianceOutput(variance_dataset(dist, part.counts, part.totals, n_active, layers, attrs), summary)


MULTI_LAYER_SHARES = (0.01, 0.05, 0.10, 0.25)
MULTI_LAYER_ROWS = (1, 10, 100, 1000)


def multi_layer_curve(totals: np.ndarray, counts: np.ndarray) -> dict[str, dict[str, float]]:
    """The fraction of active latents active at two layers or more, as a layer counts from a share of the latent's
    activation mass ("by_share") or a number of rows ("by_rows"). totals, counts: [L, n]."""
    mass = totals.sum(0)
    active = mass > 0
    share = totals[:, active] / mass[active]
    by_share = {f"{s:g}": float(((share >= s).sum(0) > 1).mean()) for s in MULTI_LAYER_SHARES}
    by_rows = {str(r): float(((counts[:, active] >= r).sum(0) > 1).mean()) for r in MULTI_LAYER_ROWS}
    return {"by_share": by_share, "by_rows": by_rows}


class _LazyChunk:
    """The (indices, values, trainable, sequence) sources of one token chunk: Delayed reads of its blocks, numpy
    arrays, or (`store`) the path and token range of a latents store, which the task reads itself.

    A plain class, so dask.delayed does not traverse it and the reads run inside the chunk task. Passing dask blocks
    as task inputs instead would, with the "processes" scheduler, ship every block through the parent.
    """

    __slots__ = ("arrays", "store")

    def __init__(self, arrays: tuple[Any, ...] = (), store: tuple[str, int, int] | None = None) -> None:
        self.arrays, self.store = arrays, store


def _chunk_task(chunk: _LazyChunk, params: VarianceParams) -> _Partial:
    """Read one token chunk (from its store, or by a nested synchronous compute) and return its partial sums."""
    if chunk.store is not None:
        path, start, stop = chunk.store
        rows = Latents(path, require_complete=False).chunk(start, stop)
        return _chunk_partial(rows.indices, rows.values, rows.tokens.trainable, rows.tokens.sequence, params)
    computed = dask.compute(*chunk.arrays, scheduler="sync")
    indices, values, trainable, sequence = (np.asarray(a) for a in computed)
    return _chunk_partial(indices, values, trainable, sequence, params)


def _chunk_sources(data: Any, chunks: tuple[int, ...]) -> list[Any]:
    """One source per token chunk: a Delayed read of that block (dask's public `to_delayed`, which optimises the
    whole graph once), or a numpy view."""
    if not isinstance(data, da.Array):
        bounds = np.cumsum([0, *chunks]).tolist()
        return [np.asarray(data)[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    arr = data.rechunk({0: chunks, **dict.fromkeys(range(1, data.ndim), -1)})
    return list(arr.to_delayed(optimize_graph=False).ravel())


def _token_partials(data: Latents | LatentArrays | Any, params: VarianceParams) -> list[Delayed]:
    """One lazy `_Partial` per token chunk: per stored chunk of a latents store (each task reads its own rows from
    the store's path, so workers anywhere need only the path), else per chunk of `indices` (DEFAULT_CHUNK_TOKENS
    when not dask-backed)."""
    if isinstance(data, Latents):
        starts = range(0, data.n_tokens, data.chunk_tokens)
        stores = [(str(data.path), a, min(a + data.chunk_tokens, data.n_tokens)) for a in starts] or [
            (str(data.path), 0, 0)
        ]
        return [delayed(_chunk_task)(_LazyChunk(store=store), params) for store in stores]
    arrays = latent_arrays(data)
    size = arrays.indices.shape[0]
    if isinstance(arrays.indices, da.Array):
        chunks = tuple(arrays.indices.chunks[0])
    else:
        step = DEFAULT_CHUNK_TOKENS
        chunks = tuple(min(step, size - i) for i in range(0, size, step)) or (0,)
    sources = [_chunk_sources(a, chunks) for a in (arrays.indices, arrays.values, arrays.trainable, arrays.sequence)]
    return [delayed(_chunk_task)(_LazyChunk(tuple(block)), params) for block in zip(*sources, strict=True)]


def build_variance_graph(data: Latents | LatentArrays | Any, params: VarianceParams) -> Delayed:
    """Lazy graph whose result is compute_variance's `VarianceOutput`; building it reads no data."""
    layers = data.layers if isinstance(data, Latents) else latent_arrays(data).layers
    parts = _token_partials(data, params)
    while len(parts) > 1:
        groups = [parts[i : i + SPLIT_EVERY] for i in range(0, len(parts), SPLIT_EVERY)]
        parts = [delayed(_combine)(group, params) for group in groups]
    return delayed(_finalize)(parts[0], params, layers)


DASK_SCHEDULERS = ("threads", "threading", "processes", "multiprocessing", "sync", "synchronous", "single-threaded")


def compute_variance(
    data: Latents | LatentArrays | Any, params: VarianceParams, scheduler: str | None = None
) -> VarianceOutput:
    """Layer distribution of every latent and the variance decompositions (definitions: module docstring).

    `data`: a `Latents` store, `LatentArrays`, or an xarray Dataset of the latents variables. `scheduler`: None
    (dask.config), a dask scheduler name ("threads", "processes", "sync"), or a dask.distributed scheduler
    address ("tcp://host:port").
    """
    if scheduler is not None and "://" not in scheduler and scheduler not in DASK_SCHEDULERS:
        raise InputError(
            f"--scheduler {scheduler!r} is not a scheduler (use threads, processes, sync or a dask.distributed "
            "address like tcp://host:8786)"
        )
    graph = build_variance_graph(data, params)
    if scheduler is not None and "://" in scheduler:
        from distributed import Client

        with Client(scheduler, set_as_default=False) as client:
            return client.compute(graph).result()
    # Chunk tasks take ~0.3 s each: the processes scheduler's default batching of 6 tasks per dispatch
    # would run a graph of a few chunks on one worker (threads already use 1; distributed ignores it).
    with dask.config.set(chunksize=1):
        (result,) = dask.compute(graph, scheduler=scheduler)
    return result


@dataclasses.dataclass(frozen=True)
class VarianceConfig:
    """Everything `mlsae-analyze variance` takes; CLI options map one-to-one onto these fields."""

    latents: Path
    out: Path
    min_count: int = 1
    include_untrainable: bool = False
    scheduler: str = "threads"
    overwrite: bool = False


def run_variance(cfg: VarianceConfig) -> VarianceOutput:
    """Compute the analysis of the latents store cfg.latents and write OUT/variance.zarr and OUT/summary.json."""
    from mlsae_cache.core.outputs import check_replaceable, output_dir

    latents = Latents(cfg.latents)
    params = VarianceParams(latents.n_latents, cfg.min_count, cfg.include_untrainable)
    inputs = {"sae": latents.meta.sae_fingerprint, "cache": latents.meta.cache_fingerprint}
    check_replaceable(Path(cfg.out), "variance", inputs, cfg.overwrite)
    result = compute_variance(latents, params, cfg.scheduler)
    meta = latents.meta
    summary = dataclasses.replace(
        result.summary,
        latents=str(cfg.latents),
        n_latents=meta.n_latents,
        k=meta.k,
        layers=list(meta.layers),
        sae_fingerprint=meta.sae_fingerprint,
        cache_fingerprint=meta.cache_fingerprint,
    )
    result = dataclasses.replace(result, summary=summary)
    with output_dir(cfg.out, "variance", inputs, cfg.overwrite) as tmp:
        result.write(tmp)
    return dataclasses.replace(result, path=Path(cfg.out))


def format_summary(summary: VarianceSummary, keys: Sequence[str] = ()) -> str:
    """The summary's numbers, one per line, then the reference mode's two ratios."""
    keys = keys or (
        "var_total",
        "var_within_latent",
        "var_within_token",
        "rel_var_latent",
        "rel_var_token",
        "mean_layer_std",
        "frac_multi_layer",
        "n_rows",
    )
    lines = [f"{k:<18} {getattr(summary, k):.6g}" for k in keys]
    for mode in ("window", "reference"):
        numbers = getattr(summary, mode) or {}
        if numbers:
            shown = ", ".join(f"{k} {numbers[k]:.4g}" for k in ("rel_var_f", "rel_var_t"))
            lines.append(f"{mode + ' mode:':<18} {shown}")
    curve = (summary.multi_layer or {}).get("by_share", {})
    if curve:
        lines.append("multi-layer:       " + ", ".join(f"{float(s):.0%} of mass {v:.1%}" for s, v in curve.items()))
    return "\n".join(lines)
