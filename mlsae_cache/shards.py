"""Sharded harvest state: how N workers fill one cache side by side, and the step that completes it.

A plan splits the token chunks still to write, [first_chunk, ceil(max_tokens / chunk_tokens)), into N contiguous
ranges; worker i writes only the chunks of range i (data and per-chunk partial sums, `write_chunk_data`), so
workers never share a key. The plan is the attribute of a subgroup `harvest_shards` of the cache, and each
worker records its progress in the attribute of its own subgroup `harvest_shards/<i>` (one atomic write of a
zarr.json per commit, which only that worker writes). The arrays are sized to max_tokens when the plan is made,
so workers never rewrite array metadata either. The root attribute keeps `n_tokens` at the rows committed
before the plan until `finish` (run by whichever process completes the last shard, or by a later harvest
command) checks every shard, sums the partial statistics in chunk order, trims the arrays to the rows written,
moves `n_tokens` and removes the subgroup: the cache is then the one a single process writes, bit for bit.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import zarr

from mlsae_cache.errors import InputError, StoreError
from mlsae_cache.store import (
    CacheMeta,
    Rows,
    read_meta,
    read_partials,
    remove_partials,
    resize_store,
    set_meta,
    write_chunk_data,
    write_statistics,
)

GROUP = "harvest_shards"
ATTR = "mlsae_shards"


@dataclass(frozen=True)
class ShardPlan:
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


def plan_shards(num_shards: int, max_tokens: int, meta: CacheMeta) -> ShardPlan:
    """The plan for the rows of a cache with metadata `meta` still to write (HarvestConfig has checked the
    options themselves); InputError when there are fewer chunks left than shards."""
    ct = meta.chunk_tokens
    plan = ShardPlan(num_shards, max_tokens, meta.n_tokens // ct, ct)
    if plan.end_chunk - plan.first_chunk < num_shards:
        raise InputError(
            f"--num-shards {num_shards} is more than the {plan.end_chunk - plan.first_chunk} chunks of "
            f"{ct} tokens left to write; use at most that many shards (or a smaller --chunk-tokens)"
        )
    return plan


def read_plan(path: Path) -> ShardPlan | None:
    """The plan of a sharded harvest under way in the cache at `path`, or None."""
    if not (Path(path) / GROUP / "zarr.json").is_file():
        return None
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    return ShardPlan(**group[GROUP].attrs[ATTR])


def start_shards(path: Path, meta: CacheMeta, plan: ShardPlan, **changes: object) -> None:
    """Size the arrays for the plan and record it, every shard's progress at zero, with `changes` to the root
    attribute. Single writer."""
    root = zarr.open_group(str(path), mode="r+", zarr_format=3)
    shards = root.create_group(GROUP, overwrite=True)
    for index in range(plan.num_shards):
        shards.create_group(str(index), attributes={ATTR: asdict(ShardProgress())})
    resize_store(root, max(plan.max_tokens, meta.n_tokens), plan.chunk_tokens)
    set_meta(root, meta, max_tokens=plan.max_tokens, complete=False, **changes)
    shards.attrs[ATTR] = asdict(plan)  # last: a plan exists only once everything it needs does


def shard_dir(path: Path, index: int) -> Path:
    return Path(path) / GROUP / str(index)


def read_progress(path: Path, plan: ShardPlan) -> list[ShardProgress]:
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    return [ShardProgress(**group[f"{GROUP}/{i}"].attrs[ATTR]) for i in range(plan.num_shards)]


class ShardWriter:
    """Commits the chunks of one shard: data and partial sums, then the shard's progress. The caller holds the
    store lock shared and the shard's directory exclusively."""

    def __init__(self, path: Path, plan: ShardPlan, index: int) -> None:
        self.path, self.plan, self.index = Path(path), plan, index
        self.meta = read_meta(path)
        self.group = zarr.open_group(str(path), mode="r+", zarr_format=3)
        self.progress = read_progress(path, plan)[index]
        self.start, self.stop = plan.token_range(index)

    @property
    def resume_token(self) -> int:
        """First row to (re)write: the start of the shard's first chunk that is not full."""
        ct = self.plan.chunk_tokens
        return self.start + (self.progress.committed // ct) * ct

    def write_chunk(self, start: int, rows: Rows) -> None:
        write_chunk_data(self.group, self.meta, start, rows)
        committed = max(start + len(rows) - self.start, self.progress.committed)
        self._record(ShardProgress(committed=committed))

    def mark_done(self, exhausted: bool) -> None:
        self._record(ShardProgress(self.progress.committed, done=True, exhausted=exhausted))

    def _record(self, progress: ShardProgress) -> None:
        self.progress = progress
        self.group[f"{GROUP}/{self.index}"].attrs[ATTR] = asdict(progress)


def missing_shards(path: Path, plan: ShardPlan) -> list[int]:
    return [i for i, p in enumerate(read_progress(path, plan)) if not p.done]


def finish(path: Path, plan: ShardPlan) -> CacheMeta:
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
    root = zarr.open_group(str(path), mode="r+", zarr_format=3)
    n_tokens = max(n_tokens, meta.n_tokens)
    write_statistics(root, *read_partials(root, math.ceil(n_tokens / plan.chunk_tokens)))
    resize_store(root, n_tokens, plan.chunk_tokens)
    meta = set_meta(root, meta, n_tokens=n_tokens, complete=True, exhausted=exhausted)
    shutil.rmtree(Path(path) / GROUP)
    remove_partials(path)
    return meta
