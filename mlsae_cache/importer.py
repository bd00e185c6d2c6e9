"""Wrap an existing (token, layer, d_model) array, from any tool or synthetic, as a cache."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mlsae_cache.core.boundary import library_cause
from mlsae_cache.core.errors import InputError, Interrupted, NotFoundError
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.core.zarrstore import StoreTransaction
from mlsae_cache.harvest import library_versions
from mlsae_cache.policy import IMPORT_POLICY
from mlsae_cache.storage import STORAGE_TORCH, check_range, to_storage
from mlsae_cache.store import CacheMeta, CacheWriter, Rows, TokenRows, create_store, existing_cache


class ArrayLike(Protocol):
    """What `import_array` reads: a .npy memory map, an ndarray, or any object that returns rows on demand (e.g. a
    synthetic generator larger than memory); it is only ever sliced as arr[start:stop] along the first axis."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    def __getitem__(self, key: slice, /) -> np.ndarray: ...


@dataclass(frozen=True)
class ImportConfig:
    out: Path
    activations: Path
    token_ids: Path | None = None
    context_length: int | None = None
    dtype: str | None = None
    chunk_tokens: int = 4096
    overwrite: bool = False


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise NotFoundError(f"{what} file {path} does not exist (give a .npy file)")
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as e:  # numpy raises ValueError, EOFError, OSError, ... for what is not a whole .npy file
        raise InputError(f"{what} file {path} is not a .npy array ({library_cause(e)}); give a file of np.save") from e
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{what} file {path} is not a .npy array (an .npz archive?); give a file of np.save")
    return arr


def _new_digest(arr: ArrayLike) -> Any:
    """The fingerprint's hash, fed every chunk's token-major bytes in order as they are written (one read)."""
    return hashlib.sha256(str((arr.shape, arr.dtype.str)).encode())


def _meta(cfg: ImportConfig, acts: ArrayLike, ctx: int, dtype: str) -> CacheMeta:
    n_tokens, n_layers, d_model = acts.shape
    return CacheMeta(
        d_model=d_model,
        layers=tuple(range(n_layers)),
        model={"name": "imported", "source": str(cfg.activations)},
        dataset={"dataset": "imported", "token_ids_file": str(cfg.token_ids) if cfg.token_ids else None},
        context_length=ctx,
        storage_dtype=dtype,
        fingerprint="",  # set with complete=True, once every row has been read
        chunk_tokens=cfg.chunk_tokens,
        max_tokens=n_tokens,
        trainable_policy=IMPORT_POLICY.to_dict(),
        versions=library_versions(),
    )


def _rows(given: np.ndarray, ids: np.ndarray | None, start: int, ctx: int, dtype: str) -> Rows:
    """Rows of the cache from the given activations [n, layer, d_model] of tokens [start, start + n)."""
    stop = start + given.shape[0]
    # one copy, layer-major, in the given dtype: a float16 array stored as float16 is never widened (each
    # temporary of a chunk is fresh memory, whose first touch costs more than the arithmetic)
    wide = np.float32 if given.dtype.kind in "iu" else None
    x = torch.from_numpy(np.array(given.transpose(1, 0, 2), dtype=wide, order="C"))
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"--activations holds NaN or infinite values in rows {start}..{stop - 1} (clean the array)")
    if x.dtype != STORAGE_TORCH[dtype]:
        check_range(x.abs().amax(dim=(1, 2)), dtype, tuple(range(given.shape[1])))
    index = np.arange(start, stop)
    token_ids = np.zeros(stop - start, np.int32) if ids is None else np.asarray(ids[start:stop], np.int32)
    tokens = TokenRows(
        token_ids=token_ids,
        sequence=(index // ctx).astype(np.int64),
        position=(index % ctx).astype(np.int32),
        trainable=np.ones(stop - start, bool),
    )
    return Rows(to_storage(x, dtype), tokens)


def _inputs(cfg: ImportConfig, given: ArrayLike | None) -> tuple[ArrayLike, np.ndarray | None]:
    """The activations (`given`, else loaded from cfg.activations) and token ids of `cfg`, checked: a 3-D array of
    real numbers and whole, non-negative ids one per token."""
    acts = _load(cfg.activations, "--activations") if given is None else given
    if len(acts.shape) != 3 or 0 in acts.shape:
        raise InputError(f"--activations {cfg.activations} has shape {acts.shape}; expected (token, layer, d_model)")
    if acts.dtype.kind not in "fiu":
        raise InputError(f"--activations {cfg.activations} holds {acts.dtype} values; give real numbers (floats)")
    if cfg.chunk_tokens < 1:
        raise InputError(f"--chunk-tokens must be at least 1, got {cfg.chunk_tokens}")
    if cfg.context_length is not None and cfg.context_length < 1:
        raise InputError(f"--context-length must be at least 1, got {cfg.context_length}")
    ids = _load(cfg.token_ids, "--token-ids") if cfg.token_ids else None
    if ids is not None and ids.shape != acts.shape[:1]:
        raise InputError(f"--token-ids has shape {ids.shape} but --activations has {acts.shape[0]} tokens")
    if ids is not None and (ids.dtype.kind not in "iu" or (ids.size and int(ids.min()) < 0)):
        raise InputError(f"--token-ids {cfg.token_ids} must hold non-negative integers, not {ids.dtype} values")
    return acts, ids


def import_array(
    cfg: ImportConfig, progress: Progress = no_progress, activations: ArrayLike | None = None
) -> CacheMeta:
    """Write `cfg.activations` [token, layer, d_model] as a complete cache; every row is trainable.

    `activations`, when given, is read instead of the file (which then only names the source in the cache's
    metadata): any array-like sliced along tokens, read one chunk of rows at a time, so an array larger than
    memory is imported in bounded memory."""
    acts, ids = _inputs(cfg, activations)
    dtype = cfg.dtype or (acts.dtype.name if acts.dtype.name in ("float16", "float32") else "float32")
    ctx = cfg.context_length or acts.shape[0]
    out = Path(cfg.out)
    if existing_cache(out) is not None and not cfg.overwrite:
        raise InputError(f"{out} already holds a cache (use --overwrite to replace it)")
    meta = _meta(cfg, acts, ctx, dtype)
    progress(0, total=acts.shape[0])
    try:
        with StoreTransaction(out, keep_on_interrupt=False) as tx:
            tx.create(lambda path: create_store(path, meta))
            writer, digest = CacheWriter(out), _new_digest(acts)
            for start in range(0, acts.shape[0], cfg.chunk_tokens):
                given = np.asarray(acts[start : start + cfg.chunk_tokens])
                digest.update(np.ascontiguousarray(given))
                writer.commit(start, _rows(given, ids, start, ctx, dtype))
                progress(given.shape[0])
            writer.trim()
            writer.set_meta(complete=True, exhausted=True, fingerprint=digest.hexdigest()[:16])
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the partial cache was removed from {out}: re-run the same command") from None
    return writer.meta
