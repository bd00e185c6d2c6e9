"""Benchmark of `mlsae-train lens`: (token, layer) rows/s of lens training and its peak memory, at two token counts.

Each run trains one epoch of the first N tokens of a cache of the embedded SmolLM2 (30 blocks, d_model 576,
vocabulary 49,152) in a fresh subprocess, so that `ru_maxrss` is that run's own peak resident memory. A row is one
(token, layer) pair through the final norm and LM head with its backward (the last block's translator is not
trained, so a token gives 29 rows); the rate counts from the first step, leaving out loading the model's head.
Memory should be flat in N: one block of chunks of rows and `--chunk-rows` rows of logits are held at a time.

Usage:
    .venv/bin/python benchmarks/lens.py [--cache DIR] [--tokens 1024 4096] [--workdir DIR]
Without --cache, a cache of the largest token count is harvested into the workdir first (the embedded model and
text; about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(cache: Path, out: Path, tokens: int, batch_tokens: int, chunk_rows: int) -> None:
    """One run of lens training; prints a JSON line with its rows, seconds and peak memory."""
    from mlsae_cache.store import Cache
    from mlsae_train.lens_train import LensConfig, run_lens

    started: list[float] = []

    def progress(n: int, /, **facts: object) -> None:
        if not started:
            started.append(time.perf_counter())

    opts = {"epochs": 1, "train_tokens": tokens, "batch_tokens": batch_tokens, "chunk_rows": chunk_rows}
    cfg = LensConfig(cache, out, overwrite=True, **opts)
    result = run_lens(cfg, progress)
    seconds = time.perf_counter() - started[0]
    trained_layers = len(Cache(cache).layers) - 1
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"tokens": result.tokens, "rows": result.tokens * trained_layers, "seconds": seconds, "peak_mb": peak_mb}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--chunk-rows", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.cache, args.out, args.child, args.batch_tokens, args.chunk_rows)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mlsae-bench-lens-"))
    cache = args.cache or work / "cache"
    if args.cache is None:
        harvest = [sys.executable, "-m", "mlsae_cache", "--quiet", "harvest", str(cache)]
        subprocess.run([*harvest, "--max-tokens", str(max(args.tokens) + 256)], check=True)
    print(f"{'tokens':>7}  {'rows':>8}  {'seconds':>8}  {'rows/s':>8}  {'tokens/s':>8}  {'peak MB':>8}")
    for n in args.tokens:
        cmd = [sys.executable, __file__, "--cache", str(cache), "--child", str(n), "--out", str(work / f"lens-{n}")]
        cmd += ["--batch-tokens", str(args.batch_tokens), "--chunk-rows", str(args.chunk_rows)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        print(
            f"{r['tokens']:>7}  {r['rows']:>8}  {r['seconds']:>8.1f}  {r['rows'] / r['seconds']:>8.0f}  "
            f"{r['tokens'] / r['seconds']:>8.1f}  {r['peak_mb']:>8.0f}"
        )


if __name__ == "__main__":
    main()
