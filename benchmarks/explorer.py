"""Benchmark of the explorer: `mlsae-analyze index` rows/s and peak memory at sizes 8x apart (memory should stay
flat in the number of tokens), and the request latency of `explore` on a large store.

Synthetic stores are written with the project's own writers: a cache imported from an array (d_model 2: the index
reads only its token arrays and fingerprint), a random SAE checkpoint, a latents store committed chunk by chunk by
`LatentsWriter` (k distinct latents per row, drifting with depth so that latents sit in bands of layers) and its
variance output. Each index build runs in a fresh subprocess, so that its peak resident memory is its own
(`os.wait4`). A row is one (token, layer) pair.

Latency: `explore` in a subprocess serves the largest store's index; GET /api/v1/latent/{j} and
/api/v1/latent/{j}/examples (20 windows of 8 tokens either side, the All tab's top examples) for random latents
that fire, after reading the store's files once (a warm page cache), over HTTP with keep-alive. Measured on the
store as `encode` writes it (format version 2: chunks of `chunk_tokens` tokens x all layers x k, each one file of
inner chunks of 64 tokens) and on a copy at format version 1 (one compressed block per chunk), with what each
costs to commit and to read whole.

With `--live INDEX`, the latency of the live routes instead (prompt, reconstruction logits, a steered
continuation) with the model of the index's cache: see benchmarks/explorer_live.py.

Usage:
    .venv/bin/python benchmarks/explorer.py [--build-sizes 32768 262144] [--serve-tokens 2097152] [--workdir DIR]
    .venv/bin/python benchmarks/explorer.py --live demo_out/explorer [--live-tokens 64] [--requests 40]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

N_LAYERS, K, N_LATENTS, CONTEXT, CHUNK_TOKENS, D_MODEL = 30, 32, 4608, 256, 4096, 2
TARGET_LATENT_MS, TARGET_EXAMPLES_MS = 100.0, 300.0


def synth_chunk(start: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Latents of rows [start, start + n): indices and values [n, L, k]."""
    rng = np.random.default_rng([seed, start])
    base = rng.integers(0, N_LATENTS, (n, 1, 1))
    drift = (np.arange(N_LAYERS)[None, :, None] // 4) * 5
    stride = rng.integers(1, N_LATENTS // K, (n, N_LAYERS, 1))
    indices = ((base + drift + np.arange(K) * stride) % N_LATENTS).astype(np.int32)
    values = rng.exponential(1.0, indices.shape).astype(np.float32)
    values[rng.random(values.shape) < 0.02] = 0
    return indices, values


def write_stores(root: Path, n_tokens: int) -> dict[str, Path]:
    """cache, sae, latents and variance of n_tokens synthetic tokens in `root` (reused when complete)."""
    import torch

    from mlsae_analyze.encode import sae_fingerprint
    from mlsae_analyze.latents import LatentsMeta
    from mlsae_analyze.variance import VarianceConfig, run_variance
    from mlsae_cache.importer import ImportConfig, import_array
    from mlsae_cache.store import Cache
    from mlsae_train.checkpoint import save_sae
    from mlsae_train.sae import SaeConfig, TopKSAE

    paths = {name: root / name for name in ("cache", "sae", "latents", "variance")}
    if (paths["variance"] / "summary.json").is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "x.npy", np.zeros((n_tokens, N_LAYERS, D_MODEL), np.float16))
    import_array(ImportConfig(paths["cache"], root / "x.npy", context_length=CONTEXT, chunk_tokens=CHUNK_TOKENS))
    (root / "x.npy").unlink()
    cache = Cache(paths["cache"])
    sae = TopKSAE(SaeConfig(d_model=D_MODEL, n_latents=N_LATENTS, k=K), generator=torch.Generator().manual_seed(0))
    save_sae(sae, paths["sae"], {"layers": list(cache.layers)})
    meta = LatentsMeta(
        n_latents=N_LATENTS,
        k=K,
        layers=cache.layers,
        sae_fingerprint=sae_fingerprint(paths["sae"]),
        cache_fingerprint=cache.meta.fingerprint,
        sae_path=str(paths["sae"]),
        cache_path=str(paths["cache"]),
        chunk_tokens=CHUNK_TOKENS,
        total_tokens=n_tokens,
    )
    write_latents(paths["latents"], meta, cache)
    run_variance(VarianceConfig(paths["latents"], paths["variance"], scheduler="processes"))
    return paths


def child_build(root: Path, out: Path) -> None:
    """Build one index (no logit effects: the synthetic SAE has no model) and print its timing as JSON."""
    from mlsae_analyze.explorer.build import IndexConfig, run_index

    paths = {name: root / name for name in ("cache", "sae", "latents", "variance")}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    cfg = IndexConfig(paths["latents"], out, paths["variance"], paths["sae"], logits=False, overwrite=True)
    result = run_index(cfg)
    print(json.dumps({"seconds": time.perf_counter() - start, "tokens": result.meta.n_tokens, "rss_before_kb": before}))


def measure_build(root: Path, out: Path) -> dict:
    """Run child_build in a fresh process; its own peak resident memory from os.wait4."""
    argv = [sys.executable, __file__, "--child-build", str(root), str(out)]
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        assert process.stdout is not None
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv)} failed:\n{err.read()}")
    record = json.loads(stdout.strip().splitlines()[-1])
    record["peak_kb"] = usage.ru_maxrss
    return record


def write_latents(path: Path, meta: Any, cache: Any) -> float:
    """Write the synthetic latents of `meta.total_tokens` tokens at `meta.version` through `LatentsWriter`, as
    `encode` commits them; the seconds spent in the commits."""
    from mlsae_analyze.latents import LatentChunk, LatentsWriter, create_latents

    create_latents(path, meta)
    writer = LatentsWriter(path)
    seconds = 0.0
    for start in range(0, meta.total_tokens, CHUNK_TOKENS):
        n = min(CHUNK_TOKENS, meta.total_tokens - start)
        chunk = LatentChunk(start, *synth_chunk(start, n), cache.tokens(start, start + n))
        began = time.perf_counter()
        writer.commit(start, chunk)
        seconds += time.perf_counter() - began
    writer.set_meta(complete=True)
    return seconds


def version_1_copy(root: Path) -> tuple[Path, dict[str, tuple[float, float, float]]]:
    """The latents of `root` again at format version 1 (one compressed block per chunk) in root/latents-v1, and,
    per version: seconds to commit every chunk, seconds to read every chunk back (as the index and `variance`
    do), and MB on disk."""
    from dataclasses import replace

    from mlsae_analyze.latents import Latents
    from mlsae_cache.store import Cache

    paths = {2: root / "latents", 1: root / "latents-v1"}
    latents = Latents(paths[2])
    cache = Cache(root / "cache")
    out = {}
    for version in (1, 2):
        path = paths[version]
        if path.exists():
            shutil.rmtree(path)
        meta = replace(latents.meta, version=version, n_tokens=0, complete=False)
        write = write_latents(path, meta, cache)
        began = time.perf_counter()
        for _ in Latents(path).chunks():
            pass
        read = time.perf_counter() - began
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
        out[f"v{version}"] = (write, read, size)
    return paths[1], out


def _get(conn: http.client.HTTPConnection, url: str) -> tuple[float, int]:
    start = time.perf_counter()
    conn.request("GET", url)
    response = conn.getresponse()
    body = response.read()
    seconds = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"GET {url}: {response.status} {body[:300]!r}")
    return seconds * 1000, len(body)


def measure_latency(index: Path, latents: Path, latent_ids: list[int]) -> dict[str, tuple[float, float, float]]:
    """Median ms, p95 ms and mean KB per route, over the given latents, from a fresh `explore` process."""
    for file in latents.rglob("*"):  # warm the page cache
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass
    argv = [
        sys.executable,
        "-m",
        "mlsae_analyze",
        "--quiet",
        "explore",
        str(index),
        "--port",
        "0",
        "--latents",
        str(latents),
    ]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        url = next(line.split()[1] for line in server.stdout if line.startswith("explorer: "))
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        routes = {"/api/v1/latent/{j}": "/api/v1/latent/{j}", "examples (20 windows)": "/api/v1/latent/{j}/examples"}
        for j in latent_ids[:3]:  # warm the server (imports, first reads)
            for url in routes.values():
                _get(conn, url.format(j=j))
        out = {}
        for name, url in routes.items():
            timings = [_get(conn, url.format(j=j)) for j in latent_ids[3:]]
            ms = [t for t, _ in timings]
            out[name] = (
                statistics.median(ms),
                float(np.percentile(ms, 95)),
                statistics.mean(b for _, b in timings) / 1e3,
            )
        conn.close()
        return out
    finally:
        server.terminate()
        server.wait()


def firing_latents(index: Path, n: int) -> list[int]:
    from mlsae_analyze.explorer.index import ExplorerIndex

    fired = ExplorerIndex(index).table().fired
    return np.random.default_rng(1).choice(np.flatnonzero(fired > 0), n + 3, replace=False).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-sizes", type=int, nargs="+", default=[32_768, 262_144])
    parser.add_argument("--serve-tokens", type=int, default=2_097_152)
    parser.add_argument("--requests", type=int, default=40, help="latents requested per route and layout")
    parser.add_argument("--workdir", type=Path, default=None, help="keep and reuse the stores here")
    parser.add_argument(
        "--latency-only", action="store_true", help="with --workdir: measure the requests on the stores and index there"
    )
    parser.add_argument(
        "--live",
        type=Path,
        default=None,
        help="an index of a real model (demo_out/explorer): time "
        "the live routes with its cache's model instead (benchmarks/explorer_live.py)",
    )
    parser.add_argument("--live-tokens", type=int, default=64, help="tokens of each --live prompt")
    parser.add_argument("--child-build", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_build:
        return child_build(*args.child_build)
    if args.live:
        from explorer_live import report_live

        return report_live(args.live, max(args.requests // 2, 5), args.live_tokens)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mlsae-bench-explorer-", dir="/tmp"))
    try:
        run(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def report_builds(builds: list[tuple[int, dict]]) -> None:
    shape = f"{N_LATENTS} latents, {N_LAYERS} layers, k {K}, chunks of {CHUNK_TOKENS} tokens"
    print(f"index build ({shape}; a row is one token at one layer)")
    print(f"{'tokens':>10}{'rows':>13}{'s':>9}{'rows/s':>12}{'tokens/s':>10}{'peak MB':>9}")
    for size, r in builds:
        rows, seconds = r["tokens"] * N_LAYERS, r["seconds"]
        rate = f"{rows / seconds:>12,.0f}{r['tokens'] / seconds:>10,.0f}"
        print(f"{size:>10,}{rows:>13,}{seconds:>9.1f}{rate}{r['peak_kb'] / 1024:>9.0f}")
    (small, a), (large, b) = builds[0], builds[-1]
    growth = b["peak_kb"] / a["peak_kb"]
    print(
        f"peak memory at {large:,} / {small:,} tokens ({large / small:.0f}x the tokens): {growth:.2f}x (target: flat)"
    )


def run(args: argparse.Namespace, workdir: Path) -> None:
    root = workdir / f"stores-{args.serve_tokens}"
    index = workdir / f"index-{args.serve_tokens}"
    if args.latency_only:
        return report_latency(args, index, {"v1": root / "latents-v1", "v2": root / "latents"})
    builds = []
    for size in sorted({*args.build_sizes, args.serve_tokens}):
        write_stores(workdir / f"stores-{size}", size)
        builds.append((size, measure_build(workdir / f"stores-{size}", workdir / f"index-{size}")))
    report_builds(builds)
    v1, costs = version_1_copy(root)
    print(f"\nlatents store of {args.serve_tokens:,} tokens, format version 1 / version 2 (inner chunks of 64 tokens)")
    print(f"{'version':<10}{'commit s':>10}{'read s':>10}{'MB':>10}")
    for version, (write, read, size) in costs.items():
        print(f"{version:<10}{write:>10.1f}{read:>10.1f}{size:>10,.0f}")
    (w1, r1, _), (w2, r2, _) = costs["v1"], costs["v2"]
    print(f"version 2 / version 1: commit {w2 / w1:.2f}x, read {r2 / r1:.2f}x")
    report_latency(args, index, {"v1": v1, "v2": root / "latents"})


def report_latency(args: argparse.Namespace, index: Path, stores: dict[str, Path]) -> None:
    ids = firing_latents(index, args.requests)
    layouts = {f"v1: chunks of {CHUNK_TOKENS}": stores["v1"], "v2: inner chunks of 64": stores["v2"]}
    shape = f"{args.serve_tokens:,} tokens x {N_LAYERS} layers, k {K}"
    print(f"\nrequest latency ({shape}; warm page cache; {args.requests} random latents; HTTP keep-alive)")
    print(f"{'route':<26}{'latents layout':<26}{'median ms':>10}{'p95 ms':>9}{'target ms':>10}{'KB':>7}")
    for layout, path in layouts.items():
        for route, (median, p95, kb) in measure_latency(index, path, ids).items():
            target = TARGET_LATENT_MS if route.startswith("/api") else TARGET_EXAMPLES_MS
            print(f"{route:<26}{layout:<26}{median:>10.1f}{p95:>9.1f}{target:>10.0f}{kb:>7.1f}")


if __name__ == "__main__":
    main()
