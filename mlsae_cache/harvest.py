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
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from mlsae_cache.config import HarvestConfig, resolve_layers
from mlsae_cache.core.errors import StoreError
from mlsae_cache.core.zarrstore import StoreTransaction
from mlsae_cache.models import LoadedModel, ModelInfo, load_model
from mlsae_cache.pipeline import HarvestResult, RowMaker, text_batches, write_rows
from mlsae_cache.policy import HARVEST_POLICY
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
        batch_size=cfg.batch_size,
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
    return HarvestResult(n, True, meta.exhausted, False, f"wrote {out}: {n} tokens x {meta.n_layers} layers{note}")


def run_harvest(
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
        return harvest_shard(cfg, out, meta, loaded, progress)
    return _harvest_here(cfg, existing, meta, loaded, progress)


def _harvest_here(
    cfg: HarvestConfig,
    existing: CacheMeta | None,
    meta: CacheMeta,
    loaded: LoadedModel,
    progress: Callable[[int], None],
) -> HarvestResult:
    """The single-process harvest: create, resume or extend OUT, or complete a parallel harvest whose workers
    are all done."""
    out = Path(cfg.out)
    # A store with no committed row (a creation cut short, say) is made afresh: nothing in it can be lost.
    fresh = existing is None or cfg.overwrite or existing.n_tokens == 0
    batch_size = meta.batch_size if fresh or existing is None else existing.batch_size
    if batch_size != cfg.batch_size:
        log.warning(
            "continuing with the cache's batch size %d (not %d) so rows match an uninterrupted run",
            batch_size,
            cfg.batch_size,
        )
    batches = text_batches(cfg, loaded.tokenizer, batch_size)
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
        exhausted = write_rows(writer.commit, batches, maker, progress, writer.resume_token, cfg.max_tokens)
        writer.set_meta(complete=True, exhausted=exhausted)
    return _finished(out, writer.meta)
