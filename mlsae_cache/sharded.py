"""One worker of a sharded harvest: `mlsae-cache harvest OUT --max-tokens T --num-shards N --shard-index i`.

Workers hold the store lock shared (a single writer, which needs it exclusively, is refused while any runs) and
their own shard's directory exclusively (the same shard twice is refused). The first worker to find no plan takes
the lock exclusively for a moment to create the store and the plan (shards.py); the others wait for it. A
worker computes the same window batches a single process would (batch i is always windows [i B, (i + 1) B)),
so its rows are the same bytes; after its last chunk it tries to take the lock exclusively and, when every
shard is done, completes the cache. Whichever shard finishes last succeeds; a later `harvest` of OUT (with or
without shard options) completes a cache whose last worker died in between.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from mlsae_cache.config import HarvestConfig
from mlsae_cache.errors import LockedError, StoreError
from mlsae_cache.harvest import HarvestResult, RowMaker, text_batches, write_rows
from mlsae_cache.lock import StoreLock
from mlsae_cache.models import LoadedModel
from mlsae_cache.shards import (
    ShardPlan,
    ShardWriter,
    finish,
    missing_shards,
    plan_shards,
    read_plan,
    shard_dir,
    start_shards,
)
from mlsae_cache.store import CacheMeta, clear_store, create_store, existing_cache

log = logging.getLogger(__name__)

PLAN_WAIT_S = 120.0  # how long a worker waits for another to finish creating the store and plan


def _prepare(cfg: HarvestConfig, out: Path, meta: CacheMeta) -> None:
    """Create the store (if there is none with rows) and the plan. Holds the lock exclusively."""
    existing = existing_cache(out)
    if existing is None or existing.n_tokens == 0:
        clear_store(out)
        create_store(out, meta)
        existing = meta
    start_shards(out, existing, _plan(cfg, existing), versions=meta.versions)


def _plan(cfg: HarvestConfig, meta: CacheMeta) -> ShardPlan:
    assert cfg.max_tokens is not None  # HarvestConfig requires it with --num-shards
    return plan_shards(cfg.num_shards, cfg.max_tokens, meta)


def _check_plan(cfg: HarvestConfig, out: Path, plan: ShardPlan) -> None:
    if (plan.num_shards, plan.max_tokens) != (cfg.num_shards, cfg.max_tokens):
        raise StoreError(
            f"{out} is being harvested in {plan.num_shards} shards up to {plan.max_tokens} tokens; run every shard "
            f"with --num-shards {plan.num_shards} --max-tokens {plan.max_tokens}, or use another OUT"
        )


def _ready(cfg: HarvestConfig, out: Path) -> tuple[bool, ShardPlan | None]:
    """(nothing to prepare, the plan): ready with a plan to work on, or with none when the cache is complete."""
    existing = existing_cache(out)
    if existing is None:
        return False, None
    plan = read_plan(out)
    if plan is not None:
        _check_plan(cfg, out, plan)
        return True, plan
    return existing.covers(cfg.max_tokens), None


def _join(cfg: HarvestConfig, out: Path, meta: CacheMeta) -> tuple[StoreLock, ShardPlan | None]:
    """The store lock held shared once the store and its plan exist (made here if no other worker has made
    them), with the plan; None for the plan when the cache turned out complete."""
    deadline = time.monotonic() + PLAN_WAIT_S
    while True:
        shared = StoreLock(out, shared=True, wait=max(0.0, deadline - time.monotonic())).acquire()
        ready, plan = _ready(cfg, out)
        if ready:
            return shared, plan
        shared.release()
        try:
            with StoreLock(out):
                if not _ready(cfg, out)[0]:
                    _prepare(cfg, out, meta)
        except LockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def harvest_shard(
    cfg: HarvestConfig, out: Path, meta: CacheMeta, loaded: LoadedModel, progress: Callable[[int], None]
) -> HarvestResult:
    """Write shard cfg.shard_index of the cache at `out`, then complete the cache if it was the last."""
    existing = existing_cache(out)
    if existing is None or read_plan(out) is None:  # refuse an impossible plan before writing anything
        _plan(cfg, existing if existing is not None and existing.n_tokens else meta)
    batch_size = existing.batch_size if existing is not None and existing.n_tokens else cfg.batch_size
    batches = text_batches(cfg, loaded.tokenizer, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    shared, plan = _join(cfg, out, meta)
    if plan is None:
        shared.release()
        return HarvestResult(0, True, False, True, f"{out} is already complete; nothing to do")
    i = cfg.shard_index
    try:
        with StoreLock(shard_dir(out, i)):
            writer = ShardWriter(out, plan, i)
            if writer.meta.batch_size != batch_size:  # the store was made meanwhile, with another batch size
                batches = text_batches(cfg, loaded.tokenizer, writer.meta.batch_size)
            if not writer.progress.done:
                exhausted = write_rows(
                    writer.write_chunk,
                    batches,
                    RowMaker(loaded, writer.meta),
                    progress,
                    writer.resume_token,
                    writer.stop,
                )
                writer.mark_done(exhausted)
    finally:
        shared.release()
    start, stop = plan.token_range(i)
    done = f"shard {i} of {plan.num_shards} (tokens {start}..{stop}) is done"
    try:
        with StoreLock(out):
            if read_plan(out) is None:  # another worker completed the cache meanwhile
                return HarvestResult(0, True, False, False, f"{done}; {out} is complete")
            missing = missing_shards(out, plan)
            if missing:
                return HarvestResult(0, False, False, False, f"{done}; waiting for shards {missing}")
            final = finish(out, plan)
    except LockedError:
        return HarvestResult(0, False, False, False, f"{done}; the last shard to finish completes {out}")
    return HarvestResult(
        final.n_tokens,
        True,
        final.exhausted,
        False,
        f"{done}; wrote {out}: {final.n_tokens} tokens x {final.n_layers} layers from {plan.num_shards} shards",
    )
