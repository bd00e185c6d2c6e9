"""A harvest split between N worker processes: `mlsae-cache harvest OUT --max-tokens T --num-shards N
--shard-index i` (each worker's share of the tokens is its "shard"; this has nothing to do with Zarr's sharding
codec, which caches do not use).

A plan splits the token chunks still to write, [first_chunk, ceil(max_tokens / chunk_tokens)), into N contiguous
ranges; worker i writes only the chunks of range i (data and per-chunk partial sums, through the cache's commit
protocol), so workers never share a key. The plan (a versioned record, `WorkerPlan`) is the attribute of a
subgroup `harvest_shards` of the cache, and each worker records its progress in the attribute of its own subgroup
`harvest_shards/<i>` (one atomic write of a zarr.json per commit, which only that worker writes). The arrays are
sized to max_tokens when the plan is made, so workers never rewrite array metadata either. The root attribute
keeps `n_tokens` at the rows committed before the plan until `finish` checks every shard, sums the partial
statistics in chunk order, trims the arrays to the rows written, moves `n_tokens` and removes the subgroup: the
cache is then the one a single process writes, bit for bit.

Locks: workers hold the store lock shared (a single writer, which needs it exclusively, is refused while any
runs) and their own shard's directory exclusively (the same shard twice is refused). The first worker to find no
plan takes the lock exclusively for a moment to create the store and the plan; the others wait for it. A worker
computes the same window batches a single process would, so its rows are the same bytes; after its last chunk it
tries to take the lock exclusively and, when every shard is done, completes the cache. Whichever shard finishes
last succeeds; a later `harvest` of OUT (with or without shard options) completes a cache whose last worker died.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import numpy as np
import zarr

from mlsae_cache.cachestats import Partials, finish_statistics
from mlsae_cache.config import HarvestConfig
from mlsae_cache.core.errors import InputError, LockedError, StoreError
from mlsae_cache.core.lock import StoreLock
from mlsae_cache.core.progress import Progress
from mlsae_cache.core.records import Record
from mlsae_cache.core.zarrstore import clear_store, remove_partials
from mlsae_cache.models import LoadedModel
from mlsae_cache.pipeline import HarvestResult, RowMaker, text_batches, write_rows
from mlsae_cache.store import (
    CacheChunkWriter,
    CacheMeta,
    Rows,
    create_store,
    existing_cache,
    read_meta,
    resize_store,
    set_meta,
)

GROUP = "harvest_shards"
ATTR = "mlsae_shards"
PLAN_WAIT_S = 120.0  # how long a worker waits for another to finish creating the store and plan


@dataclass(frozen=True)
class WorkerPlan(Record):
    """How the rows still to write are split between workers (format `mlsae-harvest-plan`)."""

    FORMAT: ClassVar[str] = "mlsae-harvest-plan"
    VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "parallel-harvest plan"
    REMAKE: ClassVar[str] = "re-harvest with --overwrite"

    num_shards: int
    max_tokens: int
    first_chunk: int
    chunk_tokens: int

    @property
    def end_chunk(self) -> int:
        return math.ceil(self.max_tokens / self.chunk_tokens)

    def token_range(self, index: int) -> tuple[int, int]:
        """Rows [start, stop) of shard `index`: whole chunks, the last shard ending at max_tokens."""
        n = self.end_chunk - self.first_chunk
        a = self.first_chunk + index * n // self.num_shards
        b = self.first_chunk + (index + 1) * n // self.num_shards
        return a * self.chunk_tokens, min(b * self.chunk_tokens, self.max_tokens)


@dataclass(frozen=True)
class ShardProgress:
    """`committed`: rows of the shard's range written so far (from its start); `done`: the shard finished,
    `exhausted`: because the text ran out before the end of its range."""

    committed: int = 0
    done: bool = False
    exhausted: bool = False


def plan_shards(num_shards: int, max_tokens: int, meta: CacheMeta) -> WorkerPlan:
    """The plan for the rows of a cache with metadata `meta` still to write (HarvestConfig has checked the
    options themselves); InputError when there are fewer chunks left than shards."""
    ct = meta.chunk_tokens
    plan = WorkerPlan(num_shards, max_tokens, meta.n_tokens // ct, ct)
    if plan.end_chunk - plan.first_chunk < num_shards:
        raise InputError(
            f"--num-shards {num_shards} is more than the {plan.end_chunk - plan.first_chunk} chunks of "
            f"{ct} tokens left to write; use at most that many shards (or a smaller --chunk-tokens)"
        )
    return plan


def _group(path: Path, mode: Literal["r", "r+"] = "r") -> zarr.Group:
    return zarr.open_group(str(path), mode=mode, zarr_format=3)


def read_plan(path: Path) -> WorkerPlan | None:
    """The plan of a parallel harvest under way in the cache at `path`, or None: also while another worker is still
    writing it (`start_shards` records the plan last), which a reader without the store's lock may see."""
    if not (Path(path) / GROUP / "zarr.json").is_file():
        return None
    attributes = _group(path)[GROUP].attrs
    if ATTR not in attributes:
        return None
    return WorkerPlan.from_dict(dict(cast(dict[str, Any], attributes[ATTR])), Path(path) / GROUP)


def start_shards(path: Path, meta: CacheMeta, plan: WorkerPlan, **changes: object) -> None:
    """Size the arrays for the plan and record it, every shard's progress at zero, with `changes` to the root
    attribute. Single writer."""
    root = _group(path, "r+")
    shards = root.create_group(GROUP, overwrite=True)
    for index in range(plan.num_shards):
        shards.create_group(str(index), attributes={ATTR: asdict(ShardProgress())})
    resize_store(root, max(plan.max_tokens, meta.n_tokens), plan.chunk_tokens)
    set_meta(root, meta, max_tokens=plan.max_tokens, complete=False, **changes)
    shards.attrs[ATTR] = plan.to_dict()  # last: a plan exists only once everything it needs does


def shard_dir(path: Path, index: int) -> Path:
    return Path(path) / GROUP / str(index)


def read_progress(path: Path, plan: WorkerPlan) -> list[ShardProgress]:
    group = _group(path)
    return [ShardProgress(**cast(dict[str, Any], group[f"{GROUP}/{i}"].attrs[ATTR])) for i in range(plan.num_shards)]


class ShardWriter(CacheChunkWriter):
    """Commits the chunks of one shard: data and partial sums, then the shard's progress. The caller holds the
    store lock shared and the shard's directory exclusively."""

    def __init__(self, path: Path, plan: WorkerPlan, index: int, direct_io: bool = True) -> None:
        super().__init__(path, direct_io)
        self.plan, self.index = plan, index
        self.progress = read_progress(path, plan)[index]
        self.start, self.stop = plan.token_range(index)

    @property
    def resume_token(self) -> int:
        """First row to (re)write: the start of the shard's first chunk that is not full."""
        ct = self.plan.chunk_tokens
        return self.start + (self.progress.committed // ct) * ct

    def _record(self, start: int, rows: Rows, derived: Partials) -> None:
        committed = max(start + len(rows) - self.start, self.progress.committed)
        self._set_progress(ShardProgress(committed=committed))

    def mark_done(self, exhausted: bool) -> None:
        self._set_progress(ShardProgress(self.progress.committed, done=True, exhausted=exhausted))

    def _set_progress(self, progress: ShardProgress) -> None:
        self.progress = progress
        self.group[f"{GROUP}/{self.index}"].attrs[ATTR] = asdict(progress)


def missing_shards(path: Path, plan: WorkerPlan) -> list[int]:
    return [i for i, p in enumerate(read_progress(path, plan)) if not p.done]


def finish(path: Path, plan: WorkerPlan) -> CacheMeta:
    """Complete a cache whose shards are all done: the cache a single process would have written. The caller
    holds the store lock exclusively."""
    progress = read_progress(path, plan)
    missing = [i for i, p in enumerate(progress) if not p.done]
    if missing:
        raise StoreError(f"{path}: shards {missing} of {plan.num_shards} have not finished; run them first")
    # rows are committed up to the end of the first shard the text ran out in (later ones hold nothing)
    n_tokens, exhausted = plan.token_range(0)[0], False
    for i, p in enumerate(progress):
        start, stop = plan.token_range(i)
        if p.committed and n_tokens != start:
            raise StoreError(f"{path}: shard {i} holds rows after the end of the text; re-harvest with --overwrite")
        if p.committed:
            n_tokens = start + p.committed
        exhausted = p.exhausted
        if not p.exhausted and p.committed != stop - start:
            raise StoreError(f"{path}: shard {i} is marked done but incomplete; re-harvest with --overwrite")
    meta = read_meta(path)
    root = _group(path, "r+")
    n_tokens = max(n_tokens, meta.n_tokens)
    finish_statistics(root, n_tokens, plan.chunk_tokens)
    resize_store(root, n_tokens, plan.chunk_tokens)
    meta = set_meta(root, meta, n_tokens=n_tokens, complete=True, exhausted=exhausted)
    shutil.rmtree(Path(path) / GROUP)
    remove_partials(path)
    return meta


# ---------------------------------------------------------------------------------------------- one worker


def _prepare(cfg: HarvestConfig, out: Path, meta: CacheMeta) -> None:
    """Create the store (if there is none with rows) and the plan. Holds the lock exclusively."""
    existing = existing_cache(out)
    if existing is None or existing.n_tokens == 0:
        clear_store(out)
        create_store(out, meta)
        existing = meta
    start_shards(out, existing, _plan(cfg, existing), versions=meta.versions)


def _plan(cfg: HarvestConfig, meta: CacheMeta) -> WorkerPlan:
    assert cfg.max_tokens is not None  # HarvestConfig requires it with --num-shards
    return plan_shards(cfg.num_shards, cfg.max_tokens, meta)


def _check_plan(cfg: HarvestConfig, out: Path, plan: WorkerPlan) -> None:
    if (plan.num_shards, plan.max_tokens) != (cfg.num_shards, cfg.max_tokens):
        raise StoreError(
            f"{out} is being harvested in {plan.num_shards} shards up to {plan.max_tokens} tokens; run every shard "
            f"with --num-shards {plan.num_shards} --max-tokens {plan.max_tokens}, or use another OUT"
        )


def _ready(cfg: HarvestConfig, out: Path) -> tuple[bool, WorkerPlan | None]:
    """(nothing to prepare, the plan): ready with a plan to work on, or with none when the cache is complete."""
    existing = existing_cache(out)
    if existing is None:
        return False, None
    plan = read_plan(out)
    if plan is not None:
        _check_plan(cfg, out, plan)
        return True, plan
    return existing.covers(cfg.max_tokens), None


def _join(cfg: HarvestConfig, out: Path, meta: CacheMeta) -> tuple[StoreLock, WorkerPlan | None]:
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


def _write_shard(
    cfg: HarvestConfig,
    out: Path,
    plan: WorkerPlan,
    loaded: LoadedModel,
    batches: tuple[int, Iterator[np.ndarray]],
    progress: Progress,
) -> None:
    """Write this worker's shard (holding its directory's lock), resuming where it stopped. `batches`: the
    window batches drawn for a batch size, redrawn if the store was made meanwhile with another."""
    i = cfg.shard_index
    with StoreLock(shard_dir(out, i)):
        writer = ShardWriter(out, plan, i, cfg.direct_io)
        if writer.progress.done:
            return
        batch_size, windows = batches
        if writer.meta.batch_size != batch_size:
            windows = text_batches(cfg, loaded.tokenizer, writer.meta.batch_size)
        maker = RowMaker(loaded, writer.meta)
        exhausted = write_rows(writer, windows, maker, progress, writer.resume_token, writer.stop)
        writer.mark_done(exhausted)


def _complete(out: Path, plan: WorkerPlan, index: int) -> HarvestResult:
    """Complete the cache if every shard is done and no other worker holds the lock."""
    start, stop = plan.token_range(index)
    done = f"shard {index} of {plan.num_shards} (tokens {start}..{stop}) is done"
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
    message = f"{done}; wrote {out}: {final.n_tokens:,} tokens x {final.n_layers} layers from {plan.num_shards} shards"
    return HarvestResult(final.n_tokens, True, final.exhausted, False, message)


def harvest_shard(
    cfg: HarvestConfig, out: Path, meta: CacheMeta, loaded: LoadedModel, progress: Progress
) -> HarvestResult:
    """Write shard cfg.shard_index of the cache at `out`, then complete the cache if it was the last."""
    existing = existing_cache(out)
    if existing is None or read_plan(out) is None:  # refuse an impossible plan before writing anything
        _plan(cfg, existing if existing is not None and existing.n_tokens else meta)
    batch_size = existing.batch_size if existing is not None and existing.n_tokens else cfg.batch_windows
    batches = text_batches(cfg, loaded.tokenizer, batch_size)  # bad or too-short text fails before any write
    out.mkdir(parents=True, exist_ok=True)
    shared, plan = _join(cfg, out, meta)
    if plan is None:
        shared.release()
        return HarvestResult(0, True, False, True, f"{out} is already complete; nothing to do")
    try:
        _write_shard(cfg, out, plan, loaded, (batch_size, batches), progress)
    finally:
        shared.release()
    return _complete(out, plan, cfg.shard_index)
