"""The harvest's compute pipeline: window batches -> forward pass with hooks -> stored rows -> one commit per token
chunk. Used alike by a single-process harvest (harvest.py) and by each worker of a parallel one (workers.py).

Resume and extension rest on one rule: batch i always holds windows [i * batch_size, (i + 1) * batch_size),
whatever `max_tokens` is, so a re-run recomputes exactly the batches an uninterrupted run computed and writes the
same bytes. A run starts at the first token chunk that is not full and overwrites it whole.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

from mlsae_cache.config import HarvestConfig
from mlsae_cache.core.allocator import keep_freed_memory
from mlsae_cache.core.progress import Progress
from mlsae_cache.core.zarrstore import ChunkCommitter
from mlsae_cache.hooks import ResidCapture
from mlsae_cache.models import LoadedModel, base_model, find_blocks
from mlsae_cache.rawchunks import aligned_empty
from mlsae_cache.storage import STORAGE_DTYPES, STORAGE_TORCH, check_range, to_storage
from mlsae_cache.store import TOKEN_DTYPES, CacheMeta, Rows, TokenRows
from mlsae_cache.text import TextSpec, window_batches


@dataclass(frozen=True)
class HarvestResult:
    """What a harvest run (or one worker of a parallel harvest) did: the cache's committed rows when it is
    complete (0 for a worker that left completing to another), whether the text ran out, whether there was
    nothing to do, and the one-line summary."""

    n_tokens: int
    complete: bool
    exhausted: bool
    noop: bool
    message: str


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
        keep_freed_memory(self.device)  # on a CPU, each forward pass reuses the last one's pages
        self.in_flight = 2 if self.device.type == "cuda" else 1
        self.capture = ResidCapture(
            base_model(model), find_blocks(model), meta.layers, STORAGE_TORCH[meta.storage_dtype], self.in_flight
        )
        self.special = sorted(set(loaded.tokenizer.all_special_ids))
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
        first = launched.first_window
        tokens = TokenRows(
            token_ids=token_ids.astype(np.int32),
            sequence=np.repeat(np.arange(first, first + n_windows, dtype=np.int64), ctx),
            position=position,
            trainable=self.meta.policy.mask(token_ids, position, self.special),
        )
        return Rows(to_storage(launched.acts, self.meta.storage_dtype), tokens)


class _ChunkBuffer:
    """One token chunk's rows, filled in place by copies of successive batches' rows (reused chunk after chunk)."""

    def __init__(self, meta: CacheMeta) -> None:
        dtype = STORAGE_DTYPES[meta.storage_dtype]
        self.activations = aligned_empty((meta.n_layers, meta.chunk_tokens, meta.d_model), dtype)
        self.tokens = TokenRows(*(np.empty(meta.chunk_tokens, dtype=dt) for dt in TOKEN_DTYPES.values()))
        self.n = 0

    def add(self, rows: Rows) -> int:
        """Copy in as many of `rows` as there is room for; how many."""
        k = min(len(rows), self.activations.shape[1] - self.n)
        self.activations[:, self.n : self.n + k] = rows.activations[:, :k]
        for held, new in zip(self.tokens, rows.tokens, strict=True):
            held[self.n : self.n + k] = new[:k]
        self.n += k
        return k

    @property
    def full(self) -> bool:
        return self.n == self.activations.shape[1]

    def rows(self) -> Rows:
        """The rows held (views)."""
        return Rows(self.activations[:, : self.n], TokenRows(*(a[: self.n] for a in self.tokens)))


class _Committer:
    """Copies rows into one of two chunk buffers used in turn and hands each full chunk to `writer.commit` on one
    background thread, in order. A buffer is filled again only after the commit that read it (the one before the
    last) has finished; at most one commit waits, which bounds memory, and an error in a commit surfaces at the
    next one. No memory is freshly allocated per chunk (fresh memory, mapped page by page, cost as much as the
    copies it saves).

    The chunk's partial sums (`writer.derive`) are computed here, on the thread that runs the model, with torch's
    intra-op threads; the commit thread only writes. Torch called from the commit thread would start a second
    team of intra-op threads beside the model's on the same cores.
    """

    def __init__(self, meta: CacheMeta, writer: ChunkCommitter[Rows], start: int) -> None:
        self.meta, self.writer, self.chunk_start = meta, writer, start
        self.buffers = [_ChunkBuffer(meta), _ChunkBuffer(meta)]
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: Future | None = None

    def add(self, rows: Rows) -> None:
        done = 0
        while done < len(rows):
            done += self.buffers[0].add(rows.slice(done, len(rows)))
            if self.buffers[0].full:
                self._submit()

    def _submit(self) -> None:
        rows = self.buffers[0].rows()
        derived = self.writer.derive(rows)  # while the commit before it may still be writing
        if self.pending is not None:
            self.pending.result()
        self.pending = self.pool.submit(self.writer.commit, self.chunk_start, rows, derived)
        self.chunk_start += self.meta.chunk_tokens
        self.buffers.reverse()  # the other one's commit finished before the one just submitted started
        self.buffers[0].n = 0

    def finish(self) -> None:
        """Commit the last, partial chunk and wait for every commit."""
        if self.buffers[0].n:
            self._submit()
        if self.pending is not None:
            self.pending.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def write_rows(
    writer: ChunkCommitter[Rows],
    batches: Iterable[np.ndarray],
    make_rows: RowMaker,
    progress: Progress,
    start: int,
    stop: int | None,
) -> bool:
    """Compute rows [start, stop) (stop None: to the end of the text) and commit them with `writer` one token
    chunk at a time; `start` is a chunk boundary. True when the text ran out before `stop`.

    Batches are launched up to `make_rows.in_flight` ahead of the one being collected (on CUDA, the next forward
    pass runs while a batch is copied off the GPU and assembled); commits overlap the next forward pass
    (`_Committer`).
    """
    meta = make_rows.meta
    per_batch = meta.batch_size * meta.context_length
    target = math.inf if stop is None else stop
    committer = _Committer(meta, writer, start)

    def assemble(pos: int, launched: _Launched) -> None:
        rows = make_rows.collect(launched)  # views, valid until more batches are launched: copied below
        rows = rows.slice(max(0, start - pos), int(min(len(rows), target - pos)))
        committer.add(rows)
        progress(len(rows))

    exhausted, launched = True, deque[tuple[int, _Launched]]()
    try:
        for i, windows in enumerate(batches):
            pos = i * per_batch
            if i < start // per_batch:
                continue
            if pos >= target:
                exhausted = False
                break
            launched.append((pos, make_rows.launch(windows, i * meta.batch_size)))
            while len(launched) >= make_rows.in_flight:
                assemble(*launched.popleft())
        while launched:
            assemble(*launched.popleft())
        committer.finish()
    finally:
        committer.close()
    return exhausted


def text_batches(cfg: HarvestConfig, tokenizer: object, batch_size: int) -> Iterator[np.ndarray]:
    """The window batches, with the first already drawn so empty or too-short text fails before any write."""
    spec = TextSpec(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column, cfg.streaming)
    batches = window_batches(spec, tokenizer, cfg.context_length, batch_size)
    return chain([next(batches)], batches)
