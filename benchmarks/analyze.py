"""Benchmark of `mlsae-analyze variance` (rows/s and peak memory, which should stay flat as the tokens grow).

Synthesises latents stores (Zarr, via xarray) at several sizes, then, each in a fresh subprocess so that
`ru_maxrss` is that run's own peak resident memory:
- `sparse`: `compute_variance` (both modes) with the chosen dask scheduler;
- `dense`: the reference code's computation (densify a [L, T, n_latents] float32 array per context window,
  normalise over layers, means over tokens and latents), on the smallest size only. Its five numbers are
  checked against the sparse reference mode.

A row is one (token, layer) pair. Usage:
    .venv/bin/python benchmarks/analyze.py [--sizes 50000 400000] [--workdir DIR] [--scheduler threads ...]
Peak memory of the processes scheduler is the larger of the parent's and the largest worker's.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

N_LAYERS, K, N_LATENTS = 30, 32, 4608
CHUNK_TOKENS = 8192
WINDOW_TOKENS = 2048
REFERENCE_KEYS = ("exp_var_tf", "exp_var_f", "var_l", "rel_var_f", "rel_var_t")


def synth_block(total_tokens: int, field: str, block_id: tuple[int, ...] = (0,)) -> np.ndarray:
    """One token chunk of synthetic latents, [C, L, k]: k distinct latents per row, shared by nearby layers."""
    n_tokens = min(CHUNK_TOKENS, total_tokens - block_id[0] * CHUNK_TOKENS)
    rng = np.random.default_rng(block_id[0])
    base = rng.integers(0, N_LATENTS, (n_tokens, 1, 1))
    drift = (np.arange(N_LAYERS)[None, :, None] // 4) * 5
    stride = rng.integers(1, N_LATENTS // K, (n_tokens, N_LAYERS, 1))
    indices = ((base + drift + np.arange(K) * stride) % N_LATENTS).astype(np.int32)
    values = rng.exponential(1.0, indices.shape).astype(np.float32)
    values[rng.random(values.shape) < 0.02] = 0  # a few inactive slots
    return indices if field == "indices" else values


def write_store(path: Path, n_tokens: int) -> None:
    """A latents store of n_tokens tokens in windows of WINDOW_TOKENS, chunked by CHUNK_TOKENS."""
    chunks = (CHUNK_TOKENS, N_LAYERS, K)
    arrays = {
        field: da.map_blocks(
            functools.partial(synth_block, n_tokens, field),
            dtype=np.int32 if field == "indices" else np.float32,
            chunks=da.core.normalize_chunks(chunks, (n_tokens, N_LAYERS, K)),
        )
        for field in ("indices", "values")
    }
    token = np.arange(n_tokens)
    ds = xr.Dataset(
        {
            "indices": (("token", "layer", "k"), arrays["indices"]),
            "values": (("token", "layer", "k"), arrays["values"]),
            "trainable": (("token",), token % WINDOW_TOKENS != 0),
            "sequence": (("token",), (token // WINDOW_TOKENS).astype(np.int64)),
        },
        coords={"layer": np.arange(N_LAYERS, dtype=np.int32)},
    ).chunk({"token": CHUNK_TOKENS})
    ds.to_zarr(path, mode="w", consolidated=False)


def dense_reference(ds: xr.Dataset) -> dict[str, float]:
    """The reference's per-window computation on dense float32 [L, T, n] arrays, averaged over windows."""
    keep = ds["trainable"].values
    sequence = ds["sequence"].values
    layers = np.arange(N_LAYERS, dtype=np.float32)[:, None, None]
    rows = []
    for seq in np.unique(sequence[keep]):
        tokens = np.flatnonzero((sequence == seq) & keep)
        indices = ds["indices"][tokens.min() : tokens.max() + 1].values[tokens - tokens.min()]
        values = ds["values"][tokens.min() : tokens.max() + 1].values[tokens - tokens.min()]
        a = np.zeros((N_LAYERS, len(tokens), N_LATENTS), np.float32)
        t, layer, _ = np.indices(indices.shape)
        np.add.at(a, (layer.ravel(), t.ravel(), indices.ravel()), values.ravel())
        with np.errstate(invalid="ignore"):
            probs = np.nan_to_num(a / a.sum(0), copy=False)
        del a
        rows.append(_reference_update(probs, layers))
    return dict(zip(REFERENCE_KEYS, np.mean(rows, 0).tolist(), strict=True))


def _reference_update(probs: np.ndarray, layers: np.ndarray) -> list[float]:
    """Metric.update of the reference: V(p) = sum_l l^2 p - (sum_l l p)^2 on unnormalised mixtures."""

    def var(x: np.ndarray) -> np.ndarray:
        ell = layers.reshape(-1, *([1] * (x.ndim - 1)))
        return (ell**2 * x).sum(0) - (ell * x).sum(0) ** 2

    exp_var_f = float(var(probs.mean(1)).mean())
    exp_var_tf = float(var(probs).mean())
    var_l = float(var(probs.mean((1, 2))))
    return [exp_var_tf, exp_var_f, var_l, exp_var_f / var_l, exp_var_tf / exp_var_f]


def child(store: str, method: str, scheduler: str) -> None:
    """Run one measurement and print it as one JSON line (the only printing is in this script)."""
    from mlsae_analyze.variance import VarianceParams, compute_variance

    ds = xr.open_zarr(store, consolidated=False)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "sparse":
        summary = compute_variance(ds, VarianceParams(N_LATENTS), scheduler=scheduler).summary
        reference = {key: summary.reference[key] for key in REFERENCE_KEYS}
    else:
        reference = dense_reference(ds)
    seconds = time.perf_counter() - start
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    n_tokens = int(ds["trainable"].sum())
    record = {"seconds": seconds, "tokens": n_tokens, "rss_before_kb": rss_before, "peak_kb": peak}
    print(json.dumps(record | {"reference": reference}))


def measure(store: Path, method: str, scheduler: str) -> dict:
    argv = [sys.executable, __file__, "--child", method, "--store", str(store), "--scheduler", scheduler]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[tuple[str, int, dict]]) -> None:
    print(f"{'method':<18}{'tokens':>9}{'rows':>12}{'s':>8}{'rows/s':>12}{'tokens/s':>10}{'peak MB':>9}")
    for name, size, r in rows:
        n_rows = r["tokens"] * N_LAYERS
        print(
            f"{name:<18}{size:>9}{n_rows:>12}{r['seconds']:>8.1f}{n_rows / r['seconds']:>12,.0f}"
            f"{r['tokens'] / r['seconds']:>10,.0f}{r['peak_kb'] / 1024:>9.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 400_000])
    parser.add_argument("--scheduler", nargs="+", default=["threads", "processes"])
    parser.add_argument("--workdir", type=Path, default=None, help="keep and reuse the stores here")
    parser.add_argument("--skip-dense", action="store_true", help="only time compute_variance")
    parser.add_argument("--child", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.store, args.child, args.scheduler[0])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mlsae-bench-analyze-"))
    rows = []
    try:
        for size in sorted(args.sizes):
            store = workdir / f"latents-{size}.zarr"
            if not store.exists():
                write_store(store, size)
            for scheduler in args.scheduler:
                rows.append((f"sparse/{scheduler}", size, measure(store, "sparse", scheduler)))
            if size == min(args.sizes) and not args.skip_dense:
                rows.append(("dense (reference)", size, measure(store, "dense", "sync")))
                diff = _max_rel_diff(rows[0][2]["reference"], rows[-1][2]["reference"])
                dense = rows[-1][2]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(rows)
    for scheduler in args.scheduler:
        runs = [r for name, _, r in rows if name == f"sparse/{scheduler}"]
        growth = runs[-1]["peak_kb"] / runs[0]["peak_kb"]
        line = f"sparse/{scheduler}: peak memory largest / smallest size {growth:.2f}x"
        if not args.skip_dense:
            speed = (runs[0]["tokens"] / runs[0]["seconds"]) / (dense["tokens"] / dense["seconds"])
            line += f"; rows/s vs dense at {min(args.sizes)} tokens {speed:.1f}x"
        print(line)
    if not args.skip_dense:
        print(f"reference-mode numbers, sparse vs dense (float32 like the reference): max rel diff {diff:.1e}")


def _max_rel_diff(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for k in REFERENCE_KEYS)


if __name__ == "__main__":
    main()
