"""Harvest: run a model over text and commit every selected block's resid_post to a cache, chunk by chunk.

Resume and extension rest on one rule: batch i always holds windows [i * batch_size, (i + 1) * batch_size),
whatever `max_tokens` is, so a re-run recomputes exactly the batches an uninterrupted run computed and writes the
same bytes. A run starts at the first token chunk that is not full and overwrites it whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from mlsae_cache.config import HarvestConfig, resolve_layers
from mlsae_cache.errors import InputError, MlsaeError, RuntimeFailure, StoreError
from mlsae_cache.hooks import ResidCapture
from mlsae_cache.lock import StoreLock
from mlsae_cache.models import LoadedModel, ModelInfo, base_model, find_blocks, load_model
from mlsae_cache.shards import finish, missing_shards, read_plan
from mlsae_cache.store import (
    CacheMeta,
    CacheWriter,
    Rows,
    clear_store,
    create_store,
    discard_store,
    existing_cache,
)
from mlsae_cache.text import TextSpec, window_batches

log = logging.getLogger(__name__)

TRAINABLE_POLICY = {"exclude_special_tokens": True, "exclude_position_0": True}
STORAGE_LIMITS = {
    "float16": float(np.finfo(np.float16).max),
    "bfloat16": float(torch.finfo(torch.bfloat16).max),
    "float32": float(np.finfo(np.float32).max),
}


@dataclass(frozen=True)
class HarvestResult:
    n_tokens: int
    complete: bool
    exhausted: bool
    noop: bool
    message: str


def library_versions() -> dict[str, str]:
    return {name: version(name) for name in ("mlsae", "torch", "transformers", "zarr")}


def fingerprint(fields: dict) -> str:
    """A hash of everything that determines the stored values (not how many there are)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def build_meta(cfg: HarvestConfig, info: ModelInfo, layers: tuple[int, ...]) -> CacheMeta:
    model = {k: v for k, v in info.__dict__.items() if k != "source"}
    dataset = TextSpec(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column).to_dict()
    determining = {
        "model": model,
        "dataset": dataset,
        "context_length": cfg.context_length,
        "layers": list(layers),
        "storage_dtype": cfg.dtype,
        "trainable_policy": TRAINABLE_POLICY,
        "chunk_tokens": cfg.chunk_tokens,
    }
    return CacheMeta(
        d_model=info.d_model,
        layers=layers,
        model=model,
        dataset=dataset,
        context_length=cfg.context_length,
        storage_dtype=cfg.dtype,
        fingerprint=fingerprint(determining),
        chunk_tokens=cfg.chunk_tokens,
        max_tokens=cfg.max_tokens,
        batch_size=cfg.batch_size,
        trainable_policy=dict(TRAINABLE_POLICY),
        versions=library_versions(),
    )


def describe_difference(old: CacheMeta, new: CacheMeta) -> str:
    for key in ("model", "dataset", "context_length", "layers", "storage_dtype", "chunk_tokens"):
        a, b = getattr(old, key), getattr(new, key)
        if a != b:
            if isinstance(a, dict):
                diffs = [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                return f"{key}: {'; '.join(diffs)}"
            return f"{key}: {a!r} vs {b!r}"
    return "settings differ"


def check_range(peaks: torch.Tensor, storage_dtype: str, layers: tuple[int, ...]) -> None:
    """Refuse values the storage dtype cannot hold (never a silent inf). shape: peaks [n_layers], max |x| per layer."""
    peaks = peaks.float().cpu()
    if not torch.isfinite(peaks).all():
        bad = [layers[i] for i in torch.nonzero(~torch.isfinite(peaks)).flatten().tolist()]
        raise RuntimeFailure(f"the model produced non-finite activations at blocks {bad} (try --compute-dtype float32)")
    limit = STORAGE_LIMITS[storage_dtype]
    over = torch.nonzero(peaks > limit).flatten().tolist()
    if over:
        raise InputError(
            f"activations at blocks {[layers[i] for i in over]} reach {peaks.max().item():.4g}, beyond the "
            f"{storage_dtype} range {limit:.4g} (use --dtype float32 or --dtype bfloat16)"
        )


STORAGE_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def to_storage(acts: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """A tensor already in the storage dtype as the stored numpy array (bfloat16 as its uint16 bit patterns)."""
    acts = acts.to(STORAGE_TORCH[storage_dtype]).cpu()
    if storage_dtype == "bfloat16":
        return acts.view(torch.int16).numpy().view(np.uint16)
    return acts.numpy()


class RowMaker:
    """Turns one batch of windows into stored rows: forward with hooks, range check, token coordinates."""

    def __init__(self, loaded: LoadedModel, meta: CacheMeta) -> None:
        self.meta = meta
        model = loaded.model
        self.capture = ResidCapture(
            base_model(model), find_blocks(model), meta.layers, STORAGE_TORCH[meta.storage_dtype]
        )
        self.device = next(model.parameters()).device
        self.special = np.asarray(sorted(set(loaded.tokenizer.all_special_ids)), dtype=np.int64)

    def __call__(self, windows: np.ndarray, first_window: int) -> Rows:
        n_windows, ctx = windows.shape
        acts, peaks = self.capture(torch.from_numpy(windows).to(self.device), self.meta.d_model)
        check_range(peaks, self.meta.storage_dtype, self.meta.layers)
        token_ids = windows.reshape(-1)
        position = np.tile(np.arange(ctx, dtype=np.int32), n_windows)
        trainable = ~np.isin(token_ids, self.special) & (position != 0)
        return Rows(
            activations=to_storage(acts, self.meta.storage_dtype),
            token_ids=token_ids.astype(np.int32),
            sequence=np.repeat(np.arange(first_window, first_window + n_windows, dtype=np.int64), ctx),
            position=position,
            trainable=trainable,
        )


def write_rows(
    commit_chunk: Callable[[int, Rows], None],
    batches: Iterable[np.ndarray],
    make_rows: RowMaker,
    progress: Callable[[int], None],
    start: int,
    stop: int | None,
) -> bool:
    """Compute rows [start, stop) (stop None: to the end of the text) and hand them to `commit_chunk` one token
    chunk at a time; `start` is a chunk boundary. True when the text ran out before `stop`.

    Commits run in order on one background thread, overlapping the next forward pass; at most one waits,
    which bounds memory, and an error in a commit surfaces at the next one.
    """
    meta = make_rows.meta
    per_batch = meta.batch_size * meta.context_length
    target = math.inf if stop is None else stop
    first_batch = start // per_batch
    chunk_start, pending, n_pending = start, [], 0
    exhausted = True
    with ThreadPoolExecutor(max_workers=1) as committer:
        commit: Future | None = None

        def submit(at: int, rows: Rows) -> Future:
            if commit is not None:
                commit.result()
            return committer.submit(commit_chunk, at, rows)

        for i, windows in enumerate(batches):
            pos = i * per_batch
            if i < first_batch:
                continue
            if pos >= target:
                exhausted = False
                break
            rows = make_rows(windows, i * meta.batch_size)
            rows = rows.slice(max(0, start - pos), int(min(len(rows), target - pos)))
            pending.append(rows)
            n_pending += len(rows)
            while n_pending >= meta.chunk_tokens:
                block = Rows.concat(pending)
                commit = submit(chunk_start, block.slice(0, meta.chunk_tokens))
                chunk_start += meta.chunk_tokens
                pending, n_pending = [block.slice(meta.chunk_tokens, len(block))], len(block) - meta.chunk_tokens
            progress(len(rows))
        if n_pending:
            commit = submit(chunk_start, Rows.concat(pending))
        if commit is not None:
            commit.result()
    return exhausted


def text_batches(cfg: HarvestConfig, tokenizer: object, batch_size: int) -> Iterator[np.ndarray]:
    """The window batches, with the first already drawn so empty or too-short text fails before any write."""
    spec = TextSpec(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column, cfg.streaming)
    batches = window_batches(spec, tokenizer, cfg.context_length, batch_size)
    return chain([next(batches)], batches)


def _check_existing(cfg: HarvestConfig, out: Path, existing: CacheMeta | None, meta: CacheMeta) -> HarvestResult | None:
    """Refuse a cache of other settings; a no-op result when it already holds what is asked for."""
    if existing is None or cfg.overwrite:
        return None
    if existing.fingerprint != meta.fingerprint:
        raise StoreError(
            f"{out} holds a cache made with other settings ({describe_difference(existing, meta)}); "
            "use --overwrite to replace it, or another OUT"
        )
    if existing.covers(cfg.max_tokens):
        n = existing.n_tokens
        return HarvestResult(
            n, True, existing.exhausted, True, f"{out} is already complete with {n} tokens; nothing to do"
        )
    return None


def _load(cfg: HarvestConfig) -> LoadedModel:
    return load_model(
        cfg.model,
        gguf_file=cfg.gguf_file,
        revision=cfg.revision,
        device=cfg.device,
        compute_dtype=cfg.compute_dtype,
        model_cache=cfg.model_cache,
    )


def _finished(out: Path, meta: CacheMeta) -> HarvestResult:
    note = " (the text ran out before --max-tokens)" if meta.exhausted and meta.max_tokens else ""
    n = meta.n_tokens
    return HarvestResult(n, True, meta.exhausted, False, f"wrote {out}: {n} tokens x {meta.n_layers} layers{note}")


def harvest(
    cfg: HarvestConfig, progress: Callable[[int], None] = lambda n: None, loaded: LoadedModel | None = None
) -> HarvestResult:
    """Create, resume or extend the cache at `cfg.out` (or one shard of it, with cfg.num_shards > 1).
    Validates every input before touching the disk."""
    out = Path(cfg.out)
    existing = existing_cache(out)
    loaded = loaded or _load(cfg)
    meta = build_meta(cfg, loaded.info, resolve_layers(cfg.layers, loaded.info.n_layers))
    done = _check_existing(cfg, out, existing, meta)
    if done is not None:
        return done
    if cfg.num_shards > 1:
        from mlsae_cache.sharded import harvest_shard

        return harvest_shard(cfg, out, meta, loaded, progress)
    # A store with no committed row (a creation cut short, say) is made afresh: nothing in it can be lost.
    created = existing is None or cfg.overwrite or existing.n_tokens == 0
    batch_size = meta.batch_size if created else existing.batch_size
    if batch_size != cfg.batch_size:
        log.warning(
            "continuing with the cache's batch size %d (not %d) so rows match an uninterrupted run",
            batch_size,
            cfg.batch_size,
        )
    batches = text_batches(cfg, loaded.tokenizer, batch_size)
    out_existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with StoreLock(out):
        plan = None if existing is None or cfg.overwrite else read_plan(out)
        if plan is not None:  # a sharded harvest: complete it if its shards are done, never write over them
            missing = missing_shards(out, plan)
            if missing:
                raise StoreError(
                    f"{out} is being harvested in {plan.num_shards} shards and shards {missing} have not finished: "
                    f"run them (--num-shards {plan.num_shards} --shard-index i), or use --overwrite to start over"
                )
            return _finished(out, finish(out, plan))
        if created:
            clear_store(out)
            create_store(out, meta)
        writer = CacheWriter(out)
        writer.set_meta(max_tokens=cfg.max_tokens, complete=False, versions=meta.versions)
        try:
            exhausted = write_rows(
                writer.write_chunk,
                batches,
                RowMaker(loaded, writer.meta),
                progress,
                writer.resume_token,
                cfg.max_tokens,
            )
        except MlsaeError:
            if created:
                discard_store(out, keep_dir=out_existed)
            raise
        writer.set_meta(complete=True, exhausted=exhausted)
    return _finished(out, writer.meta)
