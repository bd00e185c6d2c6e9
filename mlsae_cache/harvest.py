"""`mlsae-cache harvest`: create, resume or extend a cache of every selected block's resid_post.

This module decides what a run does with OUT (create, refuse, resume, extend, or nothing) from the cache's
fingerprint, then runs the compute pipeline (pipeline.py) in one process, or as one worker of a parallel harvest
(workers.py). Resume and extension rest on the pipeline's fixed batch grid: a re-run recomputes exactly the
batches an uninterrupted run computed and writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from mlsae_cache.config import HarvestConfig, resolve_layers
from mlsae_cache.core.errors import InputError, StoreError
from mlsae_cache.core.paths import gigabytes
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.core.zarrstore import StoreTransaction, interrupted
from mlsae_cache.models import LoadedModel, ModelInfo, load_model
from mlsae_cache.pipeline import HarvestResult, RowMaker, text_batches, write_rows
from mlsae_cache.policy import HARVEST_POLICY
from mlsae_cache.storage import STORAGE_DTYPES
from mlsae_cache.store import CacheMeta, CacheWriter, create_store, existing_cache
from mlsae_cache.text import TextSpec
from mlsae_cache.workers import finish, harvest_shard, missing_shards, read_plan

log = logging.getLogger(__name__)


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
        "trainable_policy": HARVEST_POLICY.to_dict(),
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
        batch_size=cfg.batch_windows,
        trainable_policy=HARVEST_POLICY.to_dict(),
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
    return HarvestResult(n, True, meta.exhausted, False, f"wrote {out}: {n:,} tokens x {meta.n_layers} layers{note}")


@dataclass(frozen=True)
class HarvestPlan:
    """What a harvest is about to write: tokens (None: all the text, not known in advance), bytes per token, the
    bytes still to write, and the free space where OUT is."""

    tokens: int | None
    tokens_done: int
    bytes_per_token: int
    free_bytes: int
    where: Path

    @property
    def bytes_to_write(self) -> int | None:
        return None if self.tokens is None else max(self.tokens - self.tokens_done, 0) * self.bytes_per_token

    def describe(self) -> str:
        per = f"{self.bytes_per_token:,} bytes per token"
        if self.tokens is None:
            size = f"all the text at {per} ({gigabytes(self.bytes_per_token * 100_000)} per 100k tokens)"
        else:
            done = f", {self.tokens_done:,} already written" if self.tokens_done else ""
            size = f"{self.tokens:,} tokens at {per}{done}: {gigabytes(self.bytes_to_write or 0)} to write"
        return f"plan: {size}; {gigabytes(self.free_bytes)} free on {self.where}"


def plan_harvest(cfg: HarvestConfig, meta: CacheMeta, existing: CacheMeta | None) -> HarvestPlan:
    """The size of what `cfg` writes: layers x d_model x the storage dtype's bytes per token, plus the token arrays
    and checksums (measured: about 40 bytes per token more)."""
    per_token = meta.n_layers * meta.d_model * np.dtype(STORAGE_DTYPES[meta.storage_dtype]).itemsize + 40
    where = Path(cfg.out).absolute()
    while not where.exists():
        where = where.parent
    done = existing.n_tokens if existing is not None and not cfg.overwrite else 0
    tokens = None if cfg.max_tokens is None else -(-cfg.max_tokens // cfg.num_shards)  # a worker: its share
    return HarvestPlan(tokens, min(done, tokens or done), per_token, shutil.disk_usage(where).free, where)


def check_space(plan: HarvestPlan) -> None:
    """Refuse a harvest the disk cannot hold, with the numbers."""
    need = plan.bytes_to_write
    if need is not None and need > plan.free_bytes:
        raise InputError(
            f"the harvest needs {gigabytes(need)} but {plan.where} has {gigabytes(plan.free_bytes)} free (free "
            "space, lower --max-tokens, store fewer --layers, or choose OUT on another disk)"
        )


def check_context_length(cfg: HarvestConfig, loaded: LoadedModel) -> None:
    """Refuse windows longer than the model's positions (their activations would be meaningless)."""
    config = loaded.model.config.get_text_config()  # type: ignore[union-attr, operator]
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and cfg.context_length > limit:
        raise InputError(
            f"--context-length {cfg.context_length} is more than model {loaded.info.name}'s {limit} positions "
            f"(use --context-length {limit} or less)"
        )


def run_harvest(
    cfg: HarvestConfig,
    progress: Progress = no_progress,
    loaded: LoadedModel | None = None,
    on_plan: Callable[[HarvestPlan], None] = lambda plan: None,
) -> HarvestResult:
    """Create, resume or extend the cache at `cfg.out` (or one shard of it, with cfg.num_shards > 1). Validates
    every input before touching the disk; `on_plan` sees the plan (size, free space) before anything is written,
    and with cfg.dry_run nothing is."""
    out = Path(cfg.out)
    existing = existing_cache(out)
    loaded = loaded or _load(cfg)
    check_context_length(cfg, loaded)
    meta = build_meta(cfg, loaded.info, resolve_layers(cfg.layers, loaded.info.n_layers))
    done = _check_existing(cfg, out, existing, meta)
    if done is not None:
        return done
    plan = plan_harvest(cfg, meta, existing)
    here = cfg.num_shards == 1 and not cfg.dry_run
    # the text is opened and its first batch drawn before the plan is shown: unreadable text is the only line
    batches = text_batches(cfg, loaded.tokenizer, _batch_size(cfg, existing, meta)) if here else None
    on_plan(plan)
    if cfg.dry_run:
        return HarvestResult(existing.n_tokens if existing else 0, False, False, True, "dry run: nothing written")
    check_space(plan)
    if batches is None:
        return harvest_shard(cfg, out, meta, loaded, progress)
    return _harvest_here(cfg, existing, meta, loaded, progress, batches)


def _fresh(cfg: HarvestConfig, existing: CacheMeta | None) -> bool:
    """Whether OUT is made afresh: a store with no committed row (a creation cut short, say) is, since nothing in
    it can be lost."""
    return existing is None or cfg.overwrite or existing.n_tokens == 0


def _batch_size(cfg: HarvestConfig, existing: CacheMeta | None, meta: CacheMeta) -> int:
    """The windows per batch: a resumed or extended cache keeps its own, so rows match an uninterrupted run."""
    batch_size = meta.batch_size if _fresh(cfg, existing) or existing is None else existing.batch_size
    if batch_size != cfg.batch_windows:
        log.warning(
            "continuing with the cache's batch size %d (not %d) so rows match an uninterrupted run",
            batch_size,
            cfg.batch_windows,
        )
    return batch_size


def _harvest_here(
    cfg: HarvestConfig,
    existing: CacheMeta | None,
    meta: CacheMeta,
    loaded: LoadedModel,
    progress: Progress,
    batches: Iterator[np.ndarray],
) -> HarvestResult:
    """The single-process harvest of `batches`: create, resume or extend OUT, or complete a parallel harvest whose
    workers are all done."""
    out = Path(cfg.out)
    fresh = _fresh(cfg, existing)
    with StoreTransaction(out) as tx:
        plan = None if existing is None or cfg.overwrite else read_plan(out)
        if plan is not None:  # a parallel harvest: complete it if its shards are done, never write over them
            missing = missing_shards(out, plan)
            if missing:
                raise StoreError(
                    f"{out} is being harvested in {plan.num_shards} shards and shards {missing} have not finished: "
                    f"run them (--num-shards {plan.num_shards} --shard-index i), or use --overwrite to start over"
                )
            return _finished(out, finish(out, plan))
        if fresh:
            tx.create(lambda path: create_store(path, meta))
        writer = CacheWriter(out, cfg.direct_io)
        writer.set_meta(max_tokens=cfg.max_tokens, complete=False, versions=meta.versions)
        maker = RowMaker(loaded, writer.meta)
        progress(0, total=cfg.max_tokens, resumed_at=writer.resume_token)
        try:
            exhausted = write_rows(writer, batches, maker, progress, writer.resume_token, cfg.max_tokens)
        except KeyboardInterrupt:
            raise interrupted(out, writer.meta.n_tokens, "tokens") from None
        writer.trim()
        writer.set_meta(complete=True, exhausted=exhausted)
    return _finished(out, writer.meta)
