"""Stores with planted latents for the explorer's tests: a cache imported from an array (the tiny Llama's width and
vocabulary), a random SAE saved as a checkpoint, a latents store written row by row with the format's writer, its
variance output, and an index built from them.

Planted: latent PLANTED fires at row PLANTED_ROW with PLANTED_VALUE at layer position PLANTED_LAYER (its largest
activation anywhere) and smaller values at the other layers there, on token id PLANTED_TOKEN; elsewhere it fires
mostly at PLANTED_LAYER. Latent N_LATENTS - 1 never fires. Values sit on a coarse grid, so ties occur. Rows at
window position 0 are not trainable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlsae_analyze.encode import sae_fingerprint
from mlsae_analyze.latents import LatentChunk, Latents, LatentsMeta, LatentsWriter, create_latents
from mlsae_analyze.variance import VarianceConfig, run_variance
from mlsae_cache.importer import ImportConfig, import_array
from mlsae_cache.store import Cache, TokenRows
from mlsae_train.checkpoint import save_sae
from mlsae_train.sae import SaeConfig, TopKSAE

N_TOKENS, N_LAYERS, K, N_LATENTS, CONTEXT, D_MODEL = 640, 4, 4, 24, 64, 32
PLANTED, PLANTED_ROW, PLANTED_LAYER, PLANTED_VALUE, PLANTED_TOKEN = 7, 200, 2, 50.0, 300
PLANTED_STRIP = (0.0, 5.0, PLANTED_VALUE, 8.0)
FIRST_WORD, VOCAB = 262, 400  # the tiny tokenizer: 3 special tokens, 256 bytes, then merges


@dataclass(frozen=True)
class Planted:
    """The dense activations a[l, t, j] (rows left out of statistics included), token arrays and slots."""

    indices: np.ndarray
    values: np.ndarray
    tokens: TokenRows


def planted(seed: int = 0) -> Planted:
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.choice(N_LATENTS - 2, K, replace=False) for _ in range(N_TOKENS * N_LAYERS)]).reshape(
        N_TOKENS, N_LAYERS, K
    )
    indices = np.where(indices >= PLANTED, indices + 1, indices)  # latent PLANTED is placed by hand below
    values = np.round(rng.exponential(1.0, indices.shape), 1).astype(np.float32)
    values[rng.random(indices.shape) < 0.3] = 0
    for row in rng.choice(N_TOKENS, 60, replace=False):
        layer = PLANTED_LAYER if rng.random() < 0.8 else int(rng.integers(N_LAYERS))
        indices[row, layer, 0], values[row, layer, 0] = PLANTED, np.float32(np.round(rng.uniform(0.5, 3.0), 1))
    for layer, value in enumerate(PLANTED_STRIP):
        indices[PLANTED_ROW, layer, 0], values[PLANTED_ROW, layer, 0] = PLANTED, value
    indices = np.where(values > 0, indices, -1).astype(np.int32)  # inactive slots carry junk
    index = np.arange(N_TOKENS)
    token_ids = rng.integers(FIRST_WORD, VOCAB, N_TOKENS).astype(np.int32)  # merged tokens: whole words
    token_ids[PLANTED_ROW] = PLANTED_TOKEN
    position = (index % CONTEXT).astype(np.int32)
    tokens = TokenRows(token_ids, (index // CONTEXT).astype(np.int64), position, position != 0)
    return Planted(indices, values, tokens)


def dense(p: Planted, include_untrainable: bool = False) -> np.ndarray:
    """a[l, t, j]: [L, T, N], rows left out of the statistics zeroed unless `include_untrainable`."""
    a = np.zeros((N_LAYERS, N_TOKENS, N_LATENTS))
    t, layer, slot = np.nonzero(p.values > 0)
    np.add.at(a, (layer, t, p.indices[t, layer, slot]), p.values[t, layer, slot])
    if not include_untrainable:
        a[:, ~p.tokens.trainable] = 0
    return a


def write_latents(path: Path, p: Planted, meta: LatentsMeta) -> Latents:
    """The planted rows committed chunk by chunk into a new latents store at `path`."""
    create_latents(path, meta)
    writer = LatentsWriter(path)
    for start in range(0, N_TOKENS, meta.chunk_tokens):
        part = slice(start, start + meta.chunk_tokens)
        tokens = TokenRows(*(a[part] for a in p.tokens))
        writer.commit(start, LatentChunk(start, p.indices[part], p.values[part], tokens))
    writer.set_meta(complete=True)
    return Latents(path)


@dataclass(frozen=True)
class Stores:
    root: Path
    cache: Path
    sae: Path
    latents: Path
    variance: Path
    planted: Planted


def make_stores(root: Path, chunk_tokens: int = 128, seed: int = 0) -> Stores:
    """The four stores an index is built from, in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    p = planted(seed)
    x = np.random.default_rng(seed).normal(size=(N_TOKENS, N_LAYERS, D_MODEL)).astype(np.float32)
    np.save(root / "cache.npy", x)
    np.save(root / "ids.npy", p.tokens.token_ids)
    cache_dir = root / "cache"
    import_array(
        ImportConfig(cache_dir, root / "cache.npy", root / "ids.npy", context_length=CONTEXT, chunk_tokens=chunk_tokens)
    )
    cache = Cache(cache_dir)
    sae = TopKSAE(SaeConfig(d_model=D_MODEL, n_latents=N_LATENTS, k=K), generator=torch.Generator().manual_seed(seed))
    sae_dir = save_sae(sae, root / "sae", {"layers": list(cache.layers), "cache_fingerprint": cache.meta.fingerprint})
    meta = LatentsMeta(
        n_latents=N_LATENTS,
        k=K,
        layers=cache.layers,
        sae_fingerprint=sae_fingerprint(sae_dir),
        cache_fingerprint=cache.meta.fingerprint,
        sae_path=str(sae_dir),
        cache_path=str(cache_dir),
        chunk_tokens=chunk_tokens,
        total_tokens=N_TOKENS,
    )
    write_latents(root / "latents", p, meta)
    run_variance(VarianceConfig(root / "latents", root / "variance", scheduler="sync"))
    return Stores(root, cache_dir, sae_dir, root / "latents", root / "variance", p)
