"""Encode every (token, layer) row of a cache with a trained SAE into a latents store (resumable, like harvest).

An SAE fitted on lens-translated rows carries its lens (mlsae_train/lens.py): each row is translated by its
layer's translator before it is encoded, as in training."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlsae_analyze.latents import LatentChunk, LatentsMeta, LatentsWriter, create_latents, read_latents_meta
from mlsae_cache.core.allocator import keep_freed_memory
from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import StoreError
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.core.zarrstore import StoreTransaction, holds_nothing, interrupted
from mlsae_cache.store import Cache, open_cache
from mlsae_train.checkpoint import WEIGHTS_NAME, load_sae, resolve_sae
from mlsae_train.evaluate import check_compatible
from mlsae_train.lens import Lens, lens_of
from mlsae_train.sae import TopKSAE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeConfig:
    sae: Path | str
    cache: Path
    out: Path
    device: str = "auto"
    overwrite: bool = False
    allow_unfinished: bool = False

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a device that cannot be used is refused before any work


@dataclass(frozen=True)
class EncodeResult:
    meta: LatentsMeta
    noop: bool
    message: str


def sae_fingerprint(sae_dir: Path) -> str:
    return hashlib.sha256((Path(sae_dir) / WEIGHTS_NAME).read_bytes()).hexdigest()[:16]


@torch.no_grad()
def encode_rows(
    sae: TopKSAE, x: np.ndarray, lens: Lens | None = None, position: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (indices int32, post-ReLU values float32) of rows x [n, d_model]; with `lens`, of the rows
    translated by its layer `position`."""
    xt = torch.from_numpy(x).to(sae.b_dec.device)
    xt = lens.translate(xt, position) if lens is not None else xt
    enc = sae.encode(sae.standardize(xt.to(sae.b_dec.dtype)).x_std)
    return enc.indices.to(torch.int32).cpu().numpy(), enc.values.float().cpu().numpy()


def encode_chunk(
    sae: TopKSAE, cache: Cache, layers: tuple[int, ...], start: int, lens: Lens | None = None
) -> LatentChunk:
    """Latents of token chunk [start, start + chunk_tokens) at every layer, with its token arrays (`lens`: the
    SAE's lens lined up with `layers`)."""
    stop = min(start + cache.chunk_tokens, cache.n_tokens)
    parts = [
        encode_rows(sae, cache.activations(start, stop, cache.layer_index(layer)), lens, i)
        for i, layer in enumerate(layers)
    ]
    indices, values = np.stack([p[0] for p in parts], axis=1), np.stack([p[1] for p in parts], axis=1)
    return LatentChunk(start, indices, values, cache.tokens(start, stop))


def _plan(cfg: EncodeConfig) -> tuple[TopKSAE, Cache, LatentsMeta, Lens | None]:
    sae_dir = resolve_sae(cfg.sae)  # a hub id: its local snapshot
    sae, sae_cfg = load_sae(sae_dir, resolve_device(cfg.device), cfg.allow_unfinished)
    keep_freed_memory(sae.b_dec.device)  # on a CPU, each batch reuses the last one's pages
    cache = open_cache(cfg.cache)
    layers = tuple(sae_cfg.get("layers") or cache.layers)
    check_compatible(sae, cache, layers)
    lens = lens_of(sae_dir, sae_cfg, sae.b_dec.device)
    meta = LatentsMeta(
        n_latents=sae.cfg.n_latents,
        k=sae.cfg.k,
        layers=layers,
        sae_fingerprint=sae_fingerprint(sae_dir),
        cache_fingerprint=cache.meta.fingerprint,
        sae_path=str(sae_dir),
        cache_path=str(cfg.cache),
        chunk_tokens=cache.chunk_tokens,
        total_tokens=cache.n_tokens,
    )
    return sae, cache, meta, lens.select(layers) if lens is not None else None


def _existing(out: Path, meta: LatentsMeta, overwrite: bool) -> LatentsMeta | None:
    """The latents already at OUT that this run continues, or None to start afresh; refuses anything else."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"OUT {out} is a file (choose a directory)")
    if holds_nothing(out):
        return None
    old = read_latents_meta(out)  # StoreError for a foreign directory
    if overwrite or old.n_tokens == 0:
        return None
    same = ("sae_fingerprint", "cache_fingerprint", "layers", "chunk_tokens", "total_tokens")
    diffs = [f"{k} {getattr(old, k)!r} vs {getattr(meta, k)!r}" for k in same if getattr(old, k) != getattr(meta, k)]
    if diffs:
        raise StoreError(
            f"{out} holds latents of another SAE or cache ({'; '.join(diffs)}); use --overwrite or another OUT"
        )
    return old


def run_encode(cfg: EncodeConfig, progress: Progress = no_progress) -> EncodeResult:
    """Write (or resume) the latents of every row of the cache in cfg.out."""
    sae, cache, meta, lens = _plan(cfg)
    out = Path(cfg.out)
    old = _existing(out, meta, cfg.overwrite)
    if old is not None and old.complete:
        return EncodeResult(old, True, f"{out} is already complete ({old.n_tokens} tokens); nothing to do")
    with StoreTransaction(out) as tx:
        if old is None:
            tx.create(lambda path: create_latents(path, meta))
        writer = LatentsWriter(out)
        start = (writer.meta.n_tokens // meta.chunk_tokens) * meta.chunk_tokens
        progress(0, total=cache.n_tokens, resumed_at=start)
        try:
            for a in range(start, cache.n_tokens, meta.chunk_tokens):
                writer.commit(a, encode_chunk(sae, cache, meta.layers, a, lens))
                progress(min(meta.chunk_tokens, cache.n_tokens - a))
        except KeyboardInterrupt:
            raise interrupted(out, writer.meta.n_tokens, "tokens") from None
        writer.set_meta(complete=True)
    return EncodeResult(
        writer.meta, False, f"wrote {out}: {cache.n_tokens:,} tokens x {len(meta.layers)} layers x k={meta.k}"
    )
