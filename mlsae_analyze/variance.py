"""Where latents fire over layers, and how much of that spread is per token (METHOD.md section 6).

Input: a latents Dataset (SPEC.md section 7) with `indices` and `values` (token, layer, k), `trainable`
and `sequence` (token,), read lazily (dask) with any chunking along `token`. Notation: a[l, t, j] >= 0 is
latent j's activation at layer l and token t, built from the sparse slots (an inactive slot has value 0
whatever index it carries; two active slots of one (token, layer) row with the same index would be summed).
Layers are indexed by **position** in the store, l = 0..L-1, in both modes, whatever the `layer` coordinate
holds (a store of blocks [3, 7, 11] gives l = 0, 1, 2); the coordinate is only copied to the output. Tokens
with `trainable == False` are dropped first unless `include_untrainable=True`; every statistic of both
modes then sees the kept tokens only.

Default mode: (L, T, J) is random with p(l, t, j) = a[l, t, j] / W, W = sum a over kept tokens.
- var_total = Var(L); var_within_latent = E_J[Var(L|J)] = sum_j p(j) Var[L|j];
  var_within_token = E_{T,J}[Var(L|T,J)] = sum_{t,j} p(t, j) Var(L|t, j);
  rel_var_latent = var_within_latent / var_total; rel_var_token = var_within_token / var_within_latent.
- mean_layer_std: unweighted mean of layer_std = sqrt(Var[L|j]) over active latents (sum_l counts > 0);
  frac_multi_layer: fraction of active latents with n_layers_active > 1; n_rows: kept tokens * L, the
  number of (token, layer) rows used.

Reference mode (summary["reference"]): the computation of the reference code (github.com/tim-lawson/mlsae,
`mlsae/analysis/variances.py`: one update per dataloader batch, one window at its default batch size),
here one update per context window (a run of equal consecutive `sequence` values) with T = its kept tokens
(a window with no kept token is skipped). q[l, t, j] = a / sum_l a (0 where the sum is 0) and
V(p) = sum_l l^2 p(l) - (sum_l l p(l))^2 for a possibly unnormalised p; means run over all T * n_latents
(t, j), firing or not: exp_var_tf = mean_{t,j} V(q[:, t, j]); exp_var_f = mean_j V(mean_t q[:, t, j]);
var_l = V(mean_{t,j} q); rel_var_f = exp_var_f / var_l; rel_var_t = exp_var_tf / exp_var_f. Each is then
the unweighted mean over windows; n_windows counts them. Differences from the default mode: per-window
rather than pooled, every (t, j) weighs the same whatever its activation, and V of an unnormalised mixture
of mass m is m Var + m (1 - m) E^2, not a variance (m < 1 when a latent does not fire on every token of
the window; exp_var_f and var_l include such terms). One deviation from the reference: a ratio that is
not finite in a window (var_l = 0) is left out of that ratio's mean, where the reference returns NaN.

Graph: one task per token chunk of `indices` (`_chunk_task`: it reads its own blocks through a nested
synchronous compute of their culled read graph, so no block travels between processes whatever the input
graph is, then `_chunk_partial` reduces them to a `_Partial` of a few [L, n_latents] arrays), combined in
token order by a tree of `_combine` tasks (`SPLIT_EVERY` at a time), then `_finalize`. A window cut by a
chunk boundary stays open (`_Window`) until the neighbouring chunk is merged, so results do not depend on
chunking beyond floating-point summation order. Nothing of size tokens * n_latents exists: per-(token,
latent) sums go through a [batch_tokens, n_latents] scratch. `np.bincount` holds the GIL, so the threaded
scheduler runs about one core: use "processes" or a dask.distributed cluster to use several.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.core import flatten
from dask.delayed import Delayed, delayed
from dask.optimization import cull

from mlsae_cache.errors import InputError, StoreError

SPLIT_EVERY = 8
"""Partials combined per tree node."""

DEFAULT_CHUNK_TOKENS = 8192
"""Token chunk used when the input arrays are not dask-backed."""

REFERENCE_KEYS = ("exp_var_tf", "exp_var_f", "var_l", "rel_var_f", "rel_var_t")
_N_METRICS = len(REFERENCE_KEYS)


@dataclasses.dataclass(frozen=True)
class VarianceConfig:
    """Options of the variance analysis.

    `scratch_entries` bounds the dense (token, latent) scratch of one token batch: a batch holds
    max(1, scratch_entries // n_latents) tokens (memory ~ 5 * 8 * scratch_entries bytes per worker thread).
    """

    n_latents: int
    min_count: int = 1
    include_untrainable: bool = False
    scratch_entries: int = 2**18

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
class _Window:
    """Reference-mode sums of one context window over the tokens seen so far.

    sums: shape [4] = (T, sum_{t,j} V(q[:, t, j]), sum_{t,j} m1[t, j], sum_{t,j} m2[t, j]) with
    m1 = sum_l l q[l, t, j] and m2 = sum_l l^2 q[l, t, j]; a_row: shape [n_latents], sum_t m1[t, j].
    """

    seq: int
    sums: np.ndarray
    a_row: np.ndarray


@dataclasses.dataclass(frozen=True)
class _RefPartial:
    """Reference-mode state of a contiguous token range.

    edges: the first and last windows of the range (one if it holds one window, none if empty), which may
    continue outside it; done: shape [1 + 2 * 5] = (number of closed windows, the sum of each metric over
    them, the number of finite values of each metric).
    """

    edges: tuple[_Window, ...]
    done: np.ndarray


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
    ref: _RefPartial


def _empty_done() -> np.ndarray:
    return np.zeros(1 + 2 * _N_METRICS)


def _window_metrics(window: _Window, n_latents: int) -> np.ndarray:
    """The reference's five numbers for one complete window, shape [5].

    With N = T * n: exp_var_tf = sum V / N; exp_var_f = sum m2 / N - sum_j A_j^2 / (T^2 n);
    var_l = sum m2 / N - (sum m1 / N)^2; rel_var_f = exp_var_f / var_l; rel_var_t = exp_var_tf / exp_var_f.
    """
    n_tok, sum_var, sum_m1, sum_m2 = window.sums
    size = n_tok * n_latents
    exp_var_tf = sum_var / size
    exp_var_f = sum_m2 / size - float(window.a_row @ window.a_row) / (n_tok * size)
    var_l = sum_m2 / size - (sum_m1 / size) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.divide([exp_var_f, exp_var_tf], [var_l, exp_var_f])
    return np.array([exp_var_tf, exp_var_f, var_l, *ratios])


def _close(done: np.ndarray, windows: list[_Window], n_latents: int) -> np.ndarray:
    """Add complete windows to `done`; a non-finite ratio (0/0) is left out of that metric's mean."""
    done = done.copy()
    for window in windows:
        metrics = _window_metrics(window, n_latents)
        finite = np.isfinite(metrics)
        done[0] += 1
        done[1 : 1 + _N_METRICS] += np.where(finite, metrics, 0.0)
        done[1 + _N_METRICS :] += finite
    return done


def _ref_merge(windows: list[_Window], done: np.ndarray, n_latents: int) -> _RefPartial:
    """Reference state of consecutive windows in token order: joins equal neighbours, closes interior ones."""
    joined: list[_Window] = []
    for window in windows:
        if joined and joined[-1].seq == window.seq:
            last = joined.pop()
            window = _Window(window.seq, last.sums + window.sums, last.a_row + window.a_row)
        joined.append(window)
    edges = tuple(joined[:1] + joined[1:][-1:])
    return _RefPartial(edges, _close(done, joined[1:-1], n_latents))


def _pair_moments(indices: np.ndarray, values: np.ndarray, n_latents: int) -> tuple[np.ndarray, ...]:
    """Layer moments of every (token, latent) pair that fires in B consecutive tokens.

    indices, values: [B, L, k] (inactive slots already pointing at latent 0 with value 0). A dense [B * n]
    scratch finds the P pairs with S > 0, then the moments are summed compactly. Returns, each of shape [P]:
    token, latent, S = sum_l a, M1 = sum_l a l, M2 = sum_l a l^2.
    """
    n_tok, n_layers, _ = indices.shape
    key = (np.arange(n_tok)[:, None, None] * n_latents + indices).ravel()
    act = values.ravel().astype(np.float64)
    scratch = np.bincount(key, weights=act, minlength=n_tok * n_latents)
    pairs = np.flatnonzero(scratch > 0)
    slot = np.zeros(scratch.size, dtype=np.int32)
    slot[pairs] = np.arange(len(pairs), dtype=np.int32)
    pair_of_entry = slot[key]  # a slot of an unfired pair lands on pair 0 with weight 0
    layer = np.broadcast_to(np.arange(n_layers, dtype=np.float64)[:, None], indices.shape).ravel()
    act_layer = act * layer
    m1_sum = np.bincount(pair_of_entry, weights=act_layer, minlength=len(pairs))
    m2_sum = np.bincount(pair_of_entry, weights=act_layer * layer, minlength=len(pairs))
    token, latent = np.divmod(pairs, n_latents)
    return token, latent, scratch[pairs], m1_sum, m2_sum


def _token_batch(
    indices: np.ndarray, values: np.ndarray, sequence: np.ndarray, n_latents: int
) -> tuple[float, list[_Window]]:
    """Sums of B consecutive tokens: indices, values [B, L, k] as for `_pair_moments`; sequence [B].

    With m1 = M1 / S = E[L|t,j] and m2 = M2 / S per firing pair, returns sum_{t,j} (M2 - M1 m1) and one
    `_Window` per run of equal `sequence` (non-firing pairs have q = 0 and add nothing but to T).
    """
    token, latent, s, m1_sum, m2_sum = _pair_moments(indices, values, n_latents)
    m1, m2 = m1_sum / s, m2_sum / s
    within = float((m2_sum - m1_sum * m1).sum())
    is_start = np.r_[True, sequence[1:] != sequence[:-1]]
    run = (np.cumsum(is_start) - 1)[token]
    n_runs = int(is_start.sum())
    per_pair = np.stack([np.ones_like(m1), m2 - m1 * m1, m1, m2])
    if n_runs == 1:  # the common case: no window starts inside the batch
        sums = per_pair.sum(1, keepdims=True).T
        sums[0, 0] = len(sequence)
        rows = np.bincount(latent, weights=m1, minlength=n_latents)[None]
    else:
        sums = np.stack([np.bincount(run, weights=w, minlength=n_runs) for w in per_pair], axis=1)
        sums[:, 0] = np.bincount(np.cumsum(is_start) - 1, minlength=n_runs)
        rows = np.bincount(run * n_latents + latent, weights=m1, minlength=n_runs * n_latents)
        rows = rows.reshape(n_runs, n_latents)
    seqs = sequence[is_start]
    return within, [_Window(int(seqs[r]), sums[r], rows[r]) for r in range(n_runs)]


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


def _layer_totals(indices: np.ndarray, values: np.ndarray, n_latents: int) -> tuple[np.ndarray, np.ndarray]:
    """totals[l, j] = sum_t a[l, t, j] and counts[l, j] = #{t: a[l, t, j] > 0}, each [L, n].

    One layer at a time: bincount over a [C * k] slice is ~3x faster than over a [C * L * k] flat key.
    """
    n_layers = indices.shape[1]
    totals = np.zeros((n_layers, n_latents))
    counts = np.zeros((n_layers, n_latents), dtype=np.int64)
    for layer in range(n_layers):
        index, value = indices[:, layer].ravel(), values[:, layer].ravel()
        totals[layer] = np.bincount(index, weights=value, minlength=n_latents)
        counts[layer] = np.bincount(index, weights=value > 0, minlength=n_latents)
    return totals, counts


def _chunk_partial(
    indices: np.ndarray, values: np.ndarray, trainable: np.ndarray, sequence: np.ndarray, cfg: VarianceConfig
) -> _Partial:
    """Partial sums of one token chunk: indices, values [C, L, k]; trainable, sequence [C]."""
    n_seen, n = len(trainable), cfg.n_latents
    if not cfg.include_untrainable:
        keep = np.asarray(trainable, dtype=bool)
        indices, values, sequence = indices[keep], values[keep], sequence[keep]
    indices = np.where(values > 0, indices, 0)
    _check_block(indices, values, n)
    totals, counts = _layer_totals(indices, values, n)
    n_tok = len(indices)
    within, windows = 0.0, []
    for start in range(0, n_tok, cfg.batch_tokens):
        batch = slice(start, start + cfg.batch_tokens)
        part_within, part_windows = _token_batch(indices[batch], values[batch], sequence[batch], n)
        within += part_within
        windows.extend(part_windows)
    ref = _ref_merge(windows, _empty_done(), n)
    return _Partial(totals, counts, n_tok, n_seen, within, ref)


def _combine(parts: list[_Partial], cfg: VarianceConfig) -> _Partial:
    """Merge partials of consecutive token ranges, given in token order."""
    windows = [w for p in parts for w in p.ref.edges]
    done = np.sum([p.ref.done for p in parts], axis=0)
    return _Partial(
        totals=np.sum([p.totals for p in parts], axis=0),
        counts=np.sum([p.counts for p in parts], axis=0),
        n_tokens=sum(p.n_tokens for p in parts),
        n_seen=sum(p.n_seen for p in parts),
        within_token=float(sum(p.within_token for p in parts)),
        ref=_ref_merge(windows, done, cfg.n_latents),
    )


def _layer_distribution(totals: np.ndarray, counts: np.ndarray, min_count: int) -> dict[str, np.ndarray]:
    """P_j(l) = totals[l, j] / sum_l totals[l, j]; E[L|j] = sum_l l P_j(l); Var[L|j] = sum_l (l - E)^2 P_j(l).

    Shapes: totals, counts, probs [L, n]; the rest [n]. Never-active latents get NaN.
    """
    per_latent = totals.sum(0)
    probs = np.divide(totals, per_latent, out=np.full_like(totals, np.nan), where=per_latent > 0)
    layer = np.arange(totals.shape[0], dtype=np.float64)[:, None]
    mean = (layer * probs).sum(0)
    var = ((layer - mean) ** 2 * probs).sum(0)
    return {
        "counts": counts,
        "totals": totals,
        "probs": probs,
        "layer_mean": mean,
        "layer_var": var,
        "layer_std": np.sqrt(var),
        "n_layers_active": (counts >= min_count).sum(0).astype(np.int64),
    }


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den != 0 else float("nan")


def _decomposition(dist: dict[str, np.ndarray], within_token: float) -> dict[str, float]:
    """Law of total variance under p(l, t, j) = a[l, t, j] / W.

    var_total = Var(L) = sum_l p(l) (l - E[L])^2; var_within_latent = E_J[Var(L|J)] = sum_j p(j) Var[L|j];
    var_within_token = E_{T,J}[Var(L|T,J)] = sum_{t,j} sum_l a (l - E[L|t,j])^2 / W.
    """
    totals = dist["totals"]
    weight = totals.sum()
    p_layer = totals.sum(1) / weight
    layer = np.arange(len(p_layer), dtype=np.float64)
    var_total = float((p_layer * (layer - p_layer @ layer) ** 2).sum())
    active = totals.sum(0) > 0
    p_latent = totals.sum(0)[active] / weight
    var_within_latent = float(p_latent @ dist["layer_var"][active])
    var_within_token = float(within_token / weight)
    return {
        "var_total": var_total,
        "var_within_latent": var_within_latent,
        "var_within_token": var_within_token,
        "rel_var_latent": _ratio(var_within_latent, var_total),
        "rel_var_token": _ratio(var_within_token, var_within_latent),
        "mean_layer_std": float(dist["layer_std"][active].mean()),
        "frac_multi_layer": float((dist["n_layers_active"][active] > 1).mean()),
    }


def _reference_summary(ref: _RefPartial, n_latents: int) -> dict[str, Any]:
    """Close the remaining windows; each metric is its unweighted mean over windows (finite values only)."""
    done = _close(ref.done, list(ref.edges), n_latents)
    sums, finite = done[1 : 1 + _N_METRICS], done[1 + _N_METRICS :]
    means = {key: _ratio(s, c) for key, s, c in zip(REFERENCE_KEYS, sums, finite, strict=True)}
    return {**means, "n_windows": int(done[0])}


def _finalize(part: _Partial, cfg: VarianceConfig, layer_coord: np.ndarray) -> tuple[xr.Dataset, dict]:
    """The output Dataset (SPEC.md section 7) and the summary dict."""
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
    dist = _layer_distribution(part.totals, part.counts, cfg.min_count)
    dims = {"counts": ("layer", "latent"), "totals": ("layer", "latent"), "probs": ("layer", "latent")}
    data = {name: (dims.get(name, ("latent",)), arr) for name, arr in dist.items()}
    coords = {"layer": layer_coord, "latent": np.arange(cfg.n_latents)}
    attrs = {"min_count": cfg.min_count, "include_untrainable": cfg.include_untrainable}
    summary = {
        **_decomposition(dist, part.within_token),
        "n_rows": part.n_tokens * part.totals.shape[0],
        "reference": _reference_summary(part.ref, cfg.n_latents),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs), summary


class _LazyChunk:
    """The (indices, values, trainable, sequence) sources of one token chunk (Delayed reads or numpy).

    A plain class, so dask.delayed does not traverse it and the reads run inside the chunk task. Passing
    dask blocks as task inputs instead would, with the "processes" scheduler, ship every block through the
    parent unless dask fuses the reads, which it does not for a sliced store (`isel(token=slice(...))`).
    """

    __slots__ = ("arrays",)

    def __init__(self, arrays: tuple[Any, ...]) -> None:
        self.arrays = arrays


def _chunk_task(chunk: _LazyChunk, cfg: VarianceConfig) -> _Partial:
    """Read one token chunk (a nested synchronous compute) and return its partial sums."""
    indices, values, trainable, sequence = dask.compute(*chunk.arrays, scheduler="sync")
    arrays = (np.asarray(a) for a in (indices, values, trainable, sequence))
    return _chunk_partial(*arrays, cfg)


def _chunk_sources(data: Any, chunks: tuple[int, ...]) -> list[Any]:
    """One source per token chunk: a Delayed reading that block (graph culled to it) or a numpy view."""
    if not isinstance(data, da.Array):
        bounds = np.cumsum([0, *chunks]).tolist()
        return [np.asarray(data)[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    arr = data.rechunk({0: chunks, **{axis: -1 for axis in range(1, data.ndim)}})
    graph = dict(arr.__dask_graph__())  # materialised once; each cull below visits only what it needs
    return [Delayed(key, cull(graph, [key])[0]) for key in flatten(arr.__dask_keys__())]


def _token_partials(ds: xr.Dataset, cfg: VarianceConfig) -> list[Delayed]:
    """One lazy `_Partial` per token chunk of `indices` (DEFAULT_CHUNK_TOKENS when not dask-backed)."""
    _check_layout(ds)
    size, data = ds.sizes["token"], ds["indices"].data
    step = DEFAULT_CHUNK_TOKENS
    if isinstance(data, da.Array):
        chunks = tuple(data.chunks[0])
    else:
        chunks = tuple(min(step, size - i) for i in range(0, size, step)) or (0,)
    names = ("indices", "values", "trainable", "sequence")
    sources = [_chunk_sources(ds[name].data, chunks) for name in names]
    return [delayed(_chunk_task)(_LazyChunk(tuple(block)), cfg) for block in zip(*sources, strict=True)]


def _check_layout(ds: xr.Dataset) -> None:
    """Raise StoreError unless `ds` has the latents variables with the expected dims."""
    expected = {
        "indices": ("token", "layer", "k"),
        "values": ("token", "layer", "k"),
        "trainable": ("token",),
        "sequence": ("token",),
    }
    for name, dims in expected.items():
        if name not in ds.variables:
            raise StoreError(f"latents Dataset has no variable {name!r} (pass a store written by encode)")
        if ds[name].dims != dims:
            raise StoreError(f"latents variable {name!r} has dims {ds[name].dims}, expected {dims}")


def build_variance_graph(
    ds: xr.Dataset,
    n_latents: int,
    *,
    min_count: int = 1,
    include_untrainable: bool = False,
    scratch_entries: int = 2**18,
) -> Delayed:
    """Lazy graph whose result is compute_variance's (Dataset, summary); building it reads no data."""
    cfg = VarianceConfig(n_latents, min_count, include_untrainable, scratch_entries)
    parts = _token_partials(ds, cfg)
    while len(parts) > 1:
        groups = [parts[i : i + SPLIT_EVERY] for i in range(0, len(parts), SPLIT_EVERY)]
        parts = [delayed(_combine)(group, cfg) for group in groups]
    layer_coord = ds.indexes["layer"].values if "layer" in ds.indexes else np.arange(ds.sizes["layer"])
    return delayed(_finalize)(parts[0], cfg, layer_coord)


def compute_variance(
    ds: xr.Dataset,
    n_latents: int,
    *,
    min_count: int = 1,
    include_untrainable: bool = False,
    scheduler: str | None = None,
    scratch_entries: int = 2**18,
) -> tuple[xr.Dataset, dict[str, Any]]:
    """Layer distribution of every latent and the variance decompositions (definitions: module docstring).

    Returns the Dataset (counts, totals, probs [layer, latent]; layer_mean, layer_var, layer_std,
    n_layers_active [latent]) and the summary dict (var_total, var_within_latent, var_within_token,
    rel_var_latent, rel_var_token, mean_layer_std, frac_multi_layer, n_rows, reference). `scheduler`:
    None (dask.config), a dask scheduler name ("threads", "processes", "sync"), or a dask.distributed
    scheduler address ("tcp://host:port").
    """
    graph = build_variance_graph(
        ds,
        n_latents,
        min_count=min_count,
        include_untrainable=include_untrainable,
        scratch_entries=scratch_entries,
    )
    if scheduler is not None and "://" in scheduler:
        from distributed import Client

        with Client(scheduler, set_as_default=False) as client:
            return client.compute(graph).result()
    # Chunk tasks take ~0.3 s each: the processes scheduler's default batching of 6 tasks per dispatch
    # would run a graph of a few chunks on one worker (threads already use 1; distributed ignores it).
    with dask.config.set(chunksize=1):
        (result,) = dask.compute(graph, scheduler=scheduler)
    return result
