"""Data-parallel training: rows/s of `mlsae-train fit` in one process against `torchrun --nproc_per_node 2`, side by
side in one run.

    .venv/bin/python benchmarks/train_ddp.py [--cache PATH] [--steps 40] [--rounds 2]

Both fit the same cache with the same shapes (expansion 8, k 32), global batch (4,096 rows), seed and device (CPU),
and the torch threads add up to the machine's cores: one process with all of them, or two processes with half each
(OMP_NUM_THREADS). Rates are steady-state, from each run's metrics.jsonl between its 4th and last step (the
start-up, the first block read and the b_dec init left out), best of --rounds interleaved rounds; the wall time of the
whole command (interpreter and torchrun start-up, final checkpoint) is shown beside them. Also shown: the stored chunks
that each process reads in one epoch (loader.py: a rank reads only the chunks that its slices of the batches touch).
Without --cache, a synthetic cache is written to a temporary directory: 16,384 tokens x 16 layers x 576 float16
Gaussian rows, position 0 of each 256-token window untrainable, as harvest marks it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from mlsae_cache.store import Cache
from mlsae_train.loader import LoaderConfig, RowLoader

BATCH_ROWS = 4096
WARMUP_STEPS = 3


def synthetic_cache(tmp: Path, n_tokens: int = 16384, n_layers: int = 16, d_model: int = 576) -> Path:
    import zarr

    from mlsae_cache.importer import ImportConfig, import_array

    rng = np.random.default_rng(0)
    scales = np.geomspace(1.0, 20.0, n_layers)[None, :, None]
    x = (rng.standard_normal((n_tokens, n_layers, d_model), dtype=np.float32) * scales).astype(np.float16)
    np.save(tmp / "x.npy", x)
    del x
    import_array(ImportConfig(out=tmp / "cache", activations=tmp / "x.npy", context_length=256))
    # the importer marks every row trainable; harvest leaves out position 0 of each window, which shifts the batch
    # boundaries against the block boundaries as in a real cache
    zarr.open_group(str(tmp / "cache"), mode="r+")["trainable"][:] = np.arange(n_tokens) % 256 != 0
    (tmp / "x.npy").unlink()
    return tmp / "cache"


def fit_command(cache: Path, out: Path, n_procs: int, steps: int) -> list[str]:
    fit = ["--quiet", "fit", str(cache), str(out), "--expansion-factor", "8", "--k", "32", "--device", "cpu"]
    fit += ["--batch-rows", str(BATCH_ROWS), "--max-rows", str(steps * BATCH_ROWS), "--log-every-steps", "1"]
    fit += ["--checkpoint-every-rows", str(10**12)]  # no checkpoint among the timed steps
    if n_procs == 1:
        return [sys.executable, "-m", "mlsae_train", *fit]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_procs), "--module"]
    return [sys.executable, *launch, "mlsae_train", *fit]


def fit_rate(cache: Path, tmp: Path, n_procs: int, steps: int, cores: int) -> tuple[float, float]:
    """(steady rows/s, wall seconds) of one fit with `n_procs` processes sharing `cores` threads."""
    out = tmp / f"sae-{n_procs}-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n_procs))}
    started = time.perf_counter()
    subprocess.run(fit_command(cache, out, n_procs, steps), check=True, env=env, capture_output=True)
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # rows_per_s is the mean rate since the first step: elapsed = rows / rows_per_s
    rows = [line["rows"] for line in lines]
    elapsed = [line["rows"] / line["rows_per_s"] for line in lines]
    return (rows[-1] - rows[WARMUP_STEPS]) / (elapsed[-1] - elapsed[WARMUP_STEPS]), wall


class CountingCache(Cache):
    """A cache that records the stored chunks read through it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: set[tuple[int, int]] = set()

    def stored_chunk(self, chunk_index: int, layer_index: int) -> np.ndarray:
        self.reads.add((chunk_index, layer_index))
        return super().stored_chunk(chunk_index, layer_index)


def chunks_read(cache_path: Path, world_size: int) -> list[int]:
    """Stored chunks each rank of `world_size` reads in one epoch of batches."""
    counts = []
    for rank in range(world_size):
        cache = CountingCache(cache_path)
        cfg = LoaderConfig(batch_rows=BATCH_ROWS, rank=rank, world_size=world_size)
        loader = RowLoader(cache, cache.layers, cfg)
        batches = loader.batches()
        for _ in islice(batches, loader.rows_per_epoch // BATCH_ROWS):
            pass
        batches.close()  # waits for reads in flight
        counts.append(len(cache.reads))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="a cache (default: a synthetic one, 151 MB)")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best rate of each is shown")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = args.cache or synthetic_cache(tmp)
        runs: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for n_procs in runs:
                runs[n_procs].append(fit_rate(cache, tmp, n_procs, args.steps, cores))
        reads = {n: chunks_read(cache, n) for n in runs}
        meta = Cache(cache)
        n_units, d_model = len(meta.layers) * meta.n_chunks, meta.d_model
    print(f"torch {torch.__version__}, CPU, {cores} cores; {cache if args.cache else 'synthetic cache'}")
    print(f"d_model {d_model}, expansion 8, k 32, global batch {BATCH_ROWS} rows, {args.steps} steps per run")
    print("| processes x threads | rows/s (steady) | wall s (whole command) | chunks read per process, 1 epoch |")
    print("|---|---|---|---|")
    best = {n: max(rate for rate, _ in r) for n, r in runs.items()}
    for n_procs, results in runs.items():
        wall = min(w for _, w in results)
        label = f"{n_procs} x {max(1, cores // n_procs)}" + (" (torchrun)" if n_procs > 1 else "")
        read = ", ".join(map(str, reads[n_procs]))
        print(f"| {label} | {best[n_procs]:,.0f} | {wall:.1f} | {read} of {n_units} |")
    print(f"\nratio (2 processes / 1): {best[2] / best[1]:.2f}")


if __name__ == "__main__":
    main()
