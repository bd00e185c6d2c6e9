"""Loader throughput and shuffle quality on a real cache.

Run: `.venv/bin/python benchmarks/loader.py [--cache demo_out/cache] [--batches 40]`. Without a cache it harvests
16k SmolLM2 tokens into a temporary directory first. Prints, side by side in one run:
- shuffled rows/s of `RowLoader` (whole chunks in random order, rows permuted in blocks, background reads),
  batches in the stored dtype as the trainer takes them;
- random (token, layer) row gathers from a raw memory-mapped .npy copy of the same activations (the fastest
  unshuffled-format baseline; measured at 2.5-4.3 M rows/s warm), its pages read once before;
both in steady state, the best of two alternating runs each.
- distinct context windows and layers per batch, against the expectation under i.i.d. sampling of rows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from mlsae_cache.store import Cache
from mlsae_train.loader import LoaderConfig, RowLoader


def ensure_cache(path: Path | None, tmp: Path) -> Cache:
    if path is not None:
        return Cache(path)
    from mlsae_cache.config import HarvestConfig
    from mlsae_cache.harvest import run_harvest

    out = tmp / "cache"
    run_harvest(HarvestConfig(out=out, max_tokens=16384, device="cpu"))
    return Cache(out)


def warm_page_cache(cache: Cache) -> None:
    """Read every stored file once, so the loader, like the memmap baseline written just before, reads warm."""
    for path in cache.path.rglob("*"):
        if path.is_file():
            path.read_bytes()


def loader_rate(cache: Cache, batch_rows: int, n_batches: int, block_units: int) -> tuple[float, list]:
    """Steady-state rows/s: the loader's first blocks (its buffers are allocated then, once per run) are drawn
    before the clock starts."""
    loader = RowLoader(cache, cache.layers, LoaderConfig(batch_rows=batch_rows, block_units=block_units))
    stream = loader.batches()
    for _ in range(-(-4 * block_units * cache.chunk_tokens // batch_rows)):  # four blocks
        next(stream)
    start, batches = time.perf_counter(), []
    for _ in range(n_batches):
        batch, _ = next(stream)
        batches.append(batch._replace(x=None))  # keep the small per-row bookkeeping only
    return n_batches * batch_rows / (time.perf_counter() - start), batches


def raw_copy(cache: Cache, tmp: Path) -> np.ndarray:
    """A raw float16 memory-mapped copy of the activations [token, layer, d_model], every page read once (warm and
    mapped, as in a long run over it)."""
    path = tmp / "raw.npy"
    mm = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float16, shape=(cache.n_tokens, len(cache.layers), cache.d_model)
    )
    for a in range(0, cache.n_tokens, cache.chunk_tokens):
        mm[a : a + cache.chunk_tokens] = cache.activations(a, a + cache.chunk_tokens)
    mm.flush()
    os.sync()  # no write-back of the copy while the gathers are timed
    mm = np.load(path, mmap_mode="r")
    for a in range(0, cache.n_tokens, cache.chunk_tokens):
        mm[a : a + cache.chunk_tokens].max()
    return mm


def memmap_rate(mm: np.ndarray, batch_rows: int, n_batches: int) -> float:
    """Random (token, layer) row gathers from the raw copy, as contiguous float16 batches (as the loader hands
    them out)."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(n_batches):
        t = rng.integers(0, mm.shape[0], batch_rows)
        layer = rng.integers(0, mm.shape[1], batch_rows)
        np.ascontiguousarray(mm[t, layer])
    return n_batches * batch_rows / (time.perf_counter() - start)


def compare_with_memmap(
    cache: Cache, tmp: Path, batch_rows: int, n_batches: int, block_units: int, repeats: int = 2
) -> tuple[float, float, list]:
    """Best of `repeats` alternating runs of each: (loader rows/s, memmap gathers rows/s, the loader's batches)."""
    warm_page_cache(cache)
    mm = raw_copy(cache, tmp)
    rates, raws = [], []
    for _ in range(repeats):
        rate, batches = loader_rate(cache, batch_rows, n_batches, block_units)
        rates.append(rate)
        raws.append(memmap_rate(mm, batch_rows, n_batches))
    return max(rates), max(raws), batches


def shuffle_quality(cache: Cache, batches: list, batch_rows: int) -> dict[str, float]:
    """Distinct windows and layers per batch, measured and expected under i.i.d. rows (balls in bins)."""
    seq = cache.tokens().sequence
    n_windows, n_layers = len(np.unique(seq[cache.trainable()])), len(cache.layers)

    def expect(bins: int) -> float:
        return bins * (1 - (1 - 1 / bins) ** batch_rows)

    return {
        "layers": float(np.mean([len(np.unique(b.layer.numpy())) for b in batches])),
        "windows": float(np.mean([len(np.unique(seq[b.token.numpy()])) for b in batches])),
        "layers_iid": expect(n_layers),
        "windows_iid": expect(n_windows),
        "n_layers": n_layers,
        "n_windows": n_windows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--batch-rows", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--block-units", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = ensure_cache(args.cache, Path(tmp))
        rate, raw, batches = compare_with_memmap(cache, Path(tmp), args.batch_rows, args.batches, args.block_units)
        q = shuffle_quality(cache, batches, args.batch_rows)
    print(
        f"cache {cache.path}: {cache.n_tokens} tokens x {len(cache.layers)} layers x {cache.d_model}, "
        f"chunks of {cache.chunk_tokens} tokens; batch {args.batch_rows} rows, blocks of {args.block_units} chunks"
    )
    print(f"loader {rate:,.0f} rows/s; raw memmap random gathers {raw:,.0f} rows/s; ratio {rate / raw:.2f}")
    print(
        f"per batch: {q['layers']:.1f} distinct layers of {q['n_layers']} (i.i.d.: {q['layers_iid']:.1f}); "
        f"{q['windows']:.0f} distinct windows of {q['n_windows']} (i.i.d.: {q['windows_iid']:.0f})"
    )


if __name__ == "__main__":
    main()
