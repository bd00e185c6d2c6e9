"""Adjacent-layer cosine similarity of the mean-centred residual stream (docs/METHOD.md section 5).

cos_l = mean over trainable tokens t of cos(x[t, l] - m_l, x[t, l+1] - m_{l+1}), with m_l the cache's exact
per-layer mean; l runs over adjacent *stored* layers. One dask task per token chunk, summed in a tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from mlsae_analyze.results import COSINE_JSON, CosineResult
from mlsae_cache.core.errors import InputError
from mlsae_cache.core.outputs import check_replaceable, output_dir
from mlsae_cache.store import Cache

COSINE_TOKENS = 256
"""Tokens of a block widened to float64 at a time by `_block_cosines` (a few MB; a whole chunk's float64 copies
were GBs per dask thread)."""


def _block_cosines(x: np.ndarray, mean: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per block [n, L, d]: sums over kept tokens of the adjacent-layer cosines -> [1, L - 1]."""
    keep = keep.reshape(-1)
    total = np.zeros(x.shape[1] - 1)
    for a in range(0, x.shape[0], COSINE_TOKENS):
        xc = x[a : a + COSINE_TOKENS][keep[a : a + COSINE_TOKENS]].astype(np.float64) - mean[None]
        num = np.einsum("nld,nld->nl", xc[:, :-1], xc[:, 1:])
        norms = np.linalg.norm(xc, axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = num / (norms[:, :-1] * norms[:, 1:])
        total += np.nan_to_num(cos).sum(axis=0)
    return total[None]


def build_cosine_graph(cache: Cache) -> tuple[Any, Any]:
    """Lazy sums of cosines [L - 1] and the number of kept tokens."""
    if len(cache.layers) < 2:
        raise InputError(f"cache {cache.path} stores one layer; adjacent-layer cosines need at least two")
    x = cache.dask_activations().rechunk({0: cache.chunk_tokens, 1: -1, 2: -1})
    keep = da.from_array(cache.trainable(), chunks=(cache.chunk_tokens,))
    if not bool(keep.any().compute()):
        raise InputError(f"cache {cache.path} has no trainable token")
    sums = da.map_blocks(
        _block_cosines,
        x,
        cache.layer_mean(),
        keep[:, None, None],
        dtype=np.float64,
        chunks=((1,) * x.numblocks[0], (len(cache.layers) - 1,)),
        drop_axis=2,
    )
    return sums.sum(axis=0), keep.sum()


def adjacent_cosine(cache: Cache, scheduler: str | None = None) -> CosineResult:
    """The adjacent-layer cosines of `cache` (see the module docstring); `scheduler` as for `variance`."""
    sums, count = build_cosine_graph(cache)
    if scheduler is not None and "://" in scheduler:
        from distributed import Client

        with Client(scheduler, set_as_default=False) as client:
            sums, count = client.compute([sums, count], sync=True)
    else:
        sums, count = dask.compute(sums, count, scheduler=scheduler)
    layers = list(cache.layers)
    return CosineResult(
        layer_pairs=[[a, b] for a, b in pairwise(layers)],
        cosine=(np.asarray(sums) / int(count)).tolist(),
        n_tokens=int(count),
        cache=str(cache.path),
    )


@dataclass(frozen=True)
class CosineConfig:
    """Everything `mlsae-analyze cosine` takes; CLI options map one-to-one onto these fields."""

    cache: Path
    out: Path
    scheduler: str = "threads"
    overwrite: bool = False


def run_cosine(cfg: CosineConfig) -> CosineResult:
    """Compute the cosines of cfg.cache and write OUT/cosine.json."""
    cache = Cache(cfg.cache)
    inputs = {"cache": cache.meta.fingerprint, "n_tokens": cache.n_tokens}
    check_replaceable(Path(cfg.out), "cosine", inputs, cfg.overwrite)
    result = adjacent_cosine(cache, cfg.scheduler)
    with output_dir(cfg.out, "cosine", inputs, cfg.overwrite) as tmp:
        result.write(tmp / COSINE_JSON)
    return result
