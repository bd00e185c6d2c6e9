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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from mlsae_cache.config import HarvestConfig, resolve_layers
from mlsae_cache.errors import InputError, MlsaeError, RuntimeFailure, StoreError
from mlsae_cache.hooks import ResidCapture
from mlsae_cache.lock import StoreLock
from mlsae_cache.models import LoadedModel, ModelInfo, base_model, find_blocks, load_model
from mlsae_cache.rawchunks import aligned_empty
from mlsae_cache.shards import finish, missing_shards, read_plan
from mlsae_cache.store import (
    STORAGE_DTYPES,
    TOKEN_ARRAYS,
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


class _Launched(NamedTuple):
    """A batch whose forward pass has been launched: its windows, and its activations and peaks on the host,
    complete once `copied` (None: already complete) has happened."""

    windows: np.ndarray
    first_window: int
    acts: torch.Tensor
    peaks: torch.Tensor
    copied: torch.cuda.Event | None


class RowMaker:
    """Turns one batch of windows into stored rows: forward with hooks, range check, token coordinates.

    `launch` starts a batch and `collect` finishes it; `in_flight` batches may be launched before the oldest is
    collected. On the CPU that is one: the forward pass runs in `launch`. On CUDA it is two: `launch` queues the
    forward pass, then, on a second stream, the device-to-host copy of its activations into pinned host memory;
    `collect` waits for that copy. So batch i + 1 computes on the GPU while batch i is copied off it and its rows
    are assembled and written by the CPU. Two device buffers and two pinned host buffers are used in turn.
    """

    def __init__(self, loaded: LoadedModel, meta: CacheMeta) -> None:
        self.meta = meta
        model = loaded.model
        self.device = next(model.parameters()).device
        self.in_flight = 2 if self.device.type == "cuda" else 1
        self.capture = ResidCapture(
            base_model(model), find_blocks(model), meta.layers, STORAGE_TORCH[meta.storage_dtype], self.in_flight
        )
        self.special = np.asarray(sorted(set(loaded.tokenizer.all_special_ids)), dtype=np.int64)
        self._host: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._launches = 0
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def launch(self, windows: np.ndarray, first_window: int) -> _Launched:
        acts, peaks = self.capture(torch.from_numpy(windows).to(self.device), self.meta.d_model)
        if self._stream is None:
            return _Launched(windows, first_window, acts, peaks, None)
        slot = self._launches % self.in_flight
        self._launches += 1
        if len(self._host) <= slot:
            self._host.append((torch.empty(0), torch.empty(0)))
        host_acts, host_peaks = self._host[slot]
        if host_acts.shape != acts.shape:
            host_acts = torch.empty(acts.shape, dtype=acts.dtype, pin_memory=True)
            host_peaks = torch.empty(peaks.shape, dtype=peaks.dtype, pin_memory=True)
            self._host[slot] = (host_acts, host_peaks)
        copied = torch.cuda.Event()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            acts.record_stream(self._stream)  # freed (on a shape change) only once the copy is done
            peaks.record_stream(self._stream)
            host_acts.copy_(acts, non_blocking=True)
            host_peaks.copy_(peaks, non_blocking=True)
            copied.record()
        return _Launched(windows, first_window, host_acts, host_peaks, copied)

    def collect(self, launched: _Launched) -> Rows:
        """The stored rows of a launched batch: views, valid until `in_flight` more batches are launched."""
        if launched.copied is not None:
            launched.copied.synchronize()
        check_range(launched.peaks, self.meta.storage_dtype, self.meta.layers)
        n_windows, ctx = launched.windows.shape
        token_ids = launched.windows.reshape(-1)
        position = np.tile(np.arange(ctx, dtype=np.int32), n_windows)
        trainable = ~np.isin(token_ids, self.special) & (position != 0)
        first = launched.first_window
        return Rows(
            activations=to_storage(launched.acts, self.meta.storage_dtype),
            token_ids=token_ids.astype(np.int32),
            sequence=np.repeat(np.arange(first, first + n_windows, dtype=np.int64), ctx),
            position=position,
            trainable=trainable,
        )


class _ChunkBuffer:
    """One token chunk's rows, filled in place by copies of successive batches' rows (reused chunk after chunk)."""

    def __init__(self, meta: CacheMeta) -> None:
        dtype = STORAGE_DTYPES[meta.storage_dtype]
        self.activations = aligned_empty((meta.n_layers, meta.chunk_tokens, meta.d_model), dtype)
        self.tokens = {name: np.empty(meta.chunk_tokens, dtype=dt) for name, dt in TOKEN_ARRAYS.items()}
        self.n = 0

    def add(self, rows: Rows) -> int:
        """Copy in as many of `rows` as there is room for; how many."""
        k = min(len(rows), self.activations.shape[1] - self.n)
        self.activations[:, self.n : self.n + k] = rows.activations[:, :k]
        for name, values in self.tokens.items():
            values[self.n : self.n + k] = getattr(rows, name)[:k]
        self.n += k
        return k

    @property
    def full(self) -> bool:
        return self.n == self.activations.shape[1]

    def rows(self) -> Rows:
        """The rows held (views)."""
        return Rows(activations=self.activations[:, : self.n], **{k: v[: self.n] for k, v in self.tokens.items()})


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

    Batches are launched up to `make_rows.in_flight` ahead of the one being collected (on CUDA, the next forward
    pass runs while a batch is copied off the GPU and assembled). Commits run in order on one background thread,
    overlapping the next forward pass; at most one waits,
    which bounds memory, and an error in a commit surfaces at the next one. Each batch's rows are copied into
    one of two chunk buffers used in turn: a buffer is filled again only after the commit that read it (the one
    before the last) has finished, and no memory is freshly allocated per chunk (which, mapped page by page,
    cost as much as the copies it saves: measured 0.3 s per 4,096 SmolLM2 tokens for a concatenation).
    """
    meta = make_rows.meta
    per_batch = meta.batch_size * meta.context_length
    target = math.inf if stop is None else stop
    first_batch = start // per_batch
    chunk_start, exhausted = start, True
    buffers = [_ChunkBuffer(meta), _ChunkBuffer(meta)]
    with ThreadPoolExecutor(max_workers=1) as committer:
        commit: Future | None = None

        def submit(at: int, rows: Rows) -> Future:
            if commit is not None:
                commit.result()
            return committer.submit(commit_chunk, at, rows)

        def assemble(pos: int, launched: _Launched) -> None:
            nonlocal commit, chunk_start
            rows = make_rows.collect(launched)  # views, valid until more batches are launched: copied below
            rows = rows.slice(max(0, start - pos), int(min(len(rows), target - pos)))
            done = 0
            while done < len(rows):
                done += buffers[0].add(rows.slice(done, len(rows)))
                if buffers[0].full:
                    commit = submit(chunk_start, buffers[0].rows())
                    chunk_start += meta.chunk_tokens
                    buffers.reverse()  # the other one's commit finished before the one just submitted started
                    buffers[0].n = 0
            progress(len(rows))

        launched: deque[tuple[int, _Launched]] = deque()
        for i, windows in enumerate(batches):
            pos = i * per_batch
            if i < first_batch:
                continue
            if pos >= target:
                exhausted = False
                break
            launched.append((pos, make_rows.launch(windows, i * meta.batch_size)))
            while len(launched) >= make_rows.in_flight:
                assemble(*launched.popleft())
        while launched:
            assemble(*launched.popleft())
        if buffers[0].n:
            commit = submit(chunk_start, buffers[0].rows())
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
