"""Benchmark at scale: rows/s and peak memory of fit, eval, encode, variance, cosine and the explorer index on a
cache below and one above the machine's memory, read cold.

A synthetic cache of SmolLM2-135M's shape (30 layers, d_model 576, float16: 34.6 KB a token) is written at each
size by the importer's Python API (what `mlsae-cache import` runs) from an array that generates its rows on
demand, so no .npy of the cache's size is written first (the default sizes: 4.5 GB, and 38.5 GB, 1.5x a machine
of 25 GB). The rows have structure, not white noise: each token holds 8 atoms of a fixed dictionary (4,096 unit
vectors) with random magnitudes (3 Exp(1)), each atom strongest in its own band of layers, plus a little noise
from a fixed bank, then a per-layer scale and offset.

Each step then runs as a subprocess of the real CLI (`mlsae-train fit`, `mlsae-train eval`, `mlsae-analyze
encode`, `variance`, `cosine`, `index --no-logits`) after the page cache is dropped (`sync; echo 3 >
/proc/sys/vm/drop_caches`, as root; where that fails the script says so and goes on warm). For each step it
prints the wall time of the whole command (start-up included), the (token, layer) rows it processed, rows/s, and
the command's peak resident set (`ru_maxrss` from `os.wait4` of that one child: its own peak, file pages it had
mapped included), with the load average beside it; then, for each step, the ratio of peak memory at the largest
size to the smallest. fit trains on the same number of rows at every size and eval reads the same number of
tokens (the last ones of the cache); encode, variance, cosine and index read every row.

Usage:
    .venv/bin/python benchmarks/scale.py [--tokens 131072 1114112] [--workdir DIR] [--keep] [--steps ...]
    .venv/bin/python benchmarks/scale.py --summarize OUTPUT OUTPUT  # one table from runs of one size each
Everything written is deleted at the end of each size unless --keep. A size needs its cache (34.6 KB a token)
plus its latents (about 8 bytes per kept latent of a row) of free disk; the script refuses to start a size without it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_LAYERS, D_MODEL, CONTEXT, CHUNK_TOKENS = 30, 576, 256, 4096
N_ATOMS, ATOMS_PER_TOKEN, NOISE_ROWS, NOISE = 4096, 8, 16384, 0.05
BYTES_PER_TOKEN = 34_598  # README, Performance: float16 rows plus checksums and token arrays
BIN = Path(sys.executable).parent
STEPS = ("import", "fit", "eval", "encode", "variance", "cosine", "index")


class SyntheticActivations:
    """[token, layer, d_model] float16 rows made on demand, the same for every slicing (each block of
    CHUNK_TOKENS tokens from its own seed).

    Row (t, l) = scale_l * (sum_j m_tj * profile(a_tj, l) * atom_{a_tj} + noise_t) + offset_l, for
    ATOMS_PER_TOKEN atoms a_tj drawn per token with exponential magnitudes m_tj, profile(a, l) a bump over the
    layers centred at the atom's own layer, and noise_t a row of a fixed bank of Gaussian rows (sum of a few
    embedding rows: torch's embedding_bag, so a block costs little more than writing it).
    """

    def __init__(self, n_tokens: int, seed: int = 0) -> None:
        import torch

        self.shape = (n_tokens, N_LAYERS, D_MODEL)
        self.dtype = np.dtype(np.float16)
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        atoms = torch.randn(N_ATOMS, D_MODEL, generator=g)
        noise = NOISE * torch.randn(NOISE_ROWS, D_MODEL, generator=g)
        self.table = torch.cat([atoms / atoms.norm(dim=1, keepdim=True), noise])  # [N_ATOMS + NOISE_ROWS, d]
        centre = torch.rand(N_ATOMS, 1, generator=g) * N_LAYERS
        width = 2 + 6 * torch.rand(N_ATOMS, 1, generator=g)
        self.profile = torch.exp(-(((torch.arange(N_LAYERS) - centre) / width) ** 2))  # [N_ATOMS, L]
        self.scale = torch.linspace(1.0, 4.0, N_LAYERS)[:, None, None]  # the stream grows with depth
        self.offset = 0.5 * torch.randn(N_LAYERS, 1, D_MODEL, generator=g)
        self._out = torch.empty(CHUNK_TOKENS, N_LAYERS, D_MODEL, dtype=torch.float16)

    def block(self, index: int) -> np.ndarray:
        """Tokens [index * CHUNK_TOKENS, ...) as float16 [n, L, d], in a buffer that the next call refills (fresh
        memory costs more here than the arithmetic: every caller copies the rows at once)."""
        import torch

        n = min(CHUNK_TOKENS, self.shape[0] - index * CHUNK_TOKENS)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        atoms = torch.randint(0, N_ATOMS, (n, ATOMS_PER_TOKEN), generator=g)
        magnitude = -3 * torch.log1p(-torch.rand(n, ATOMS_PER_TOKEN, generator=g))  # 3 Exp(1), finite: rand < 1
        noise = N_ATOMS + torch.randint(0, NOISE_ROWS, (n, 1), generator=g)
        ids = torch.cat([atoms, noise], dim=1)
        weights = torch.cat([magnitude[None] * self.profile[atoms].permute(2, 0, 1), torch.ones(N_LAYERS, n, 1)], 2)
        out = self._out[:n]
        for layer in range(N_LAYERS):  # a layer at a time: the float32 rows stay in the CPU's cache
            x = torch.nn.functional.embedding_bag(ids, self.table, per_sample_weights=weights[layer], mode="sum")
            out[:, layer] = torch.addcmul(self.offset[layer], x, self.scale[layer])
        return out.numpy()

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.shape[0])
        assert step == 1
        first, last = start // CHUNK_TOKENS, (max(stop, start + 1) - 1) // CHUNK_TOKENS
        blocks = [self.block(i).copy() if first < last else self.block(i) for i in range(first, last + 1)]
        whole = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return whole[start - first * CHUNK_TOKENS : stop - first * CHUNK_TOKENS]


def child_import(out: Path, n_tokens: int) -> None:
    """The import step, in its own process: the synthetic rows written as a cache by the importer."""
    from mlsae_cache.importer import ImportConfig, import_array

    cfg = ImportConfig(out, Path("synthetic.npy"), context_length=CONTEXT, dtype="float16", chunk_tokens=CHUNK_TOKENS)
    meta = import_array(cfg, activations=SyntheticActivations(n_tokens))
    print(f"imported {meta.n_tokens} tokens")


def generation_rate(n_tokens: int = 8 * CHUNK_TOKENS) -> float:
    """MB/s of SyntheticActivations alone (it must not be what the import step measures)."""
    arr = SyntheticActivations(n_tokens)
    started = time.perf_counter()
    for i in range(0, n_tokens, CHUNK_TOKENS):
        np.ascontiguousarray(arr[i : i + CHUNK_TOKENS])
    return n_tokens * N_LAYERS * D_MODEL * 2 / 1e6 / (time.perf_counter() - started)


def drop_page_cache() -> str:
    """Empty the page cache so the step reads the store from disk; says what happened."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        return f"warm (page cache not dropped: {e.strerror})"
    return "cold"


@dataclass
class Measure:
    step: str
    tokens: int
    rows: int
    seconds: float
    peak_mb: float
    state: str
    load: float


def run_step(step: str, cmd: list[str], rows: int, tokens: int, log: Path) -> Measure:
    """Run one command in a fresh process after dropping the page cache; its wall time and own peak RSS."""
    state = drop_page_cache()
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{step} failed ({process.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return Measure(step, tokens, rows, seconds, usage.ru_maxrss / 1024, state, os.getloadavg()[0])


def commands(work: Path, n_tokens: int, args: argparse.Namespace) -> dict[str, tuple[list[str], int]]:
    """Each step's command line and the (token, layer) rows it processes."""
    cache, sae, latents, variance = work / "cache", work / "sae", work / "latents", work / "variance"
    eval_start = max(0, n_tokens - args.eval_tokens)
    quiet = ["--quiet"]
    return {
        "import": ([sys.executable, __file__, "--child-import", str(cache), "--tokens", str(n_tokens)], n_tokens),
        "fit": (
            [str(BIN / "mlsae-train"), "fit", str(cache), str(sae), "--expansion-factor", str(args.expansion),
             "--k", str(args.k), "--max-rows", str(args.max_rows), "--dead-after-rows", str(args.max_rows // 4),
             "--device", "cpu", "--overwrite", *quiet],
            args.max_rows,
        ),
        "eval": (
            [str(BIN / "mlsae-train"), "eval", str(sae), str(cache), "--start", str(eval_start), "--stop",
             str(n_tokens), "--device", "cpu", "--out", str(work / "eval.json"), *quiet],
            (n_tokens - eval_start) * N_LAYERS,
        ),
        "encode": (
            [str(BIN / "mlsae-analyze"), "encode", str(sae), str(cache), str(latents), "--device", "cpu",
             "--overwrite", *quiet],
            n_tokens * N_LAYERS,
        ),
        "variance": (
            [str(BIN / "mlsae-analyze"), "variance", str(latents), str(variance), "--overwrite", *quiet],
            n_tokens * N_LAYERS,
        ),
        "cosine": (
            [str(BIN / "mlsae-analyze"), "cosine", str(cache), str(work / "cosine"), "--overwrite", *quiet],
            n_tokens * N_LAYERS,
        ),
        "index": (
            [str(BIN / "mlsae-analyze"), "index", str(latents), str(work / "index"), "--variance", str(variance),
             "--sae", str(sae), "--cache", str(cache), "--no-logits", "--overwrite", *quiet],
            n_tokens * N_LAYERS,
        ),
    }  # fmt: skip


def check_disk(work: Path, n_tokens: int, k: int) -> None:
    need = n_tokens * (BYTES_PER_TOKEN + N_LAYERS * k * 8) * 1.05
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(f"Error: {n_tokens} tokens need about {need / 1e9:.1f} GB in {work}, {free / 1e9:.1f} GB are free")


def run_size(root: Path, n_tokens: int, args: argparse.Namespace) -> list[Measure]:
    work = root / f"tokens-{n_tokens}"
    work.mkdir(parents=True, exist_ok=True)
    check_disk(work, n_tokens, args.k)
    results = []
    try:
        for step, (cmd, rows) in commands(work, n_tokens, args).items():
            if step not in args.steps:
                continue
            m = run_step(step, cmd, rows, n_tokens, work / f"{step}.log")
            print(line(m), flush=True)
            results.append(m)
            if step == "eval":  # a check that eval read rows; fit's few steps at the default lr leave the SAE poor
                print(f"  (eval: mean FVU {json.loads((work / 'eval.json').read_text())['fvu_mean']:.3f})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


HEADER = (
    f"{'step':<9} {'tokens':>9} {'GB':>6} {'rows':>11} {'seconds':>8} {'rows/s':>10} {'peak MB':>8}  "
    f"{'page cache':<10} {'load':>5}"
)


def line(m: Measure) -> str:
    gb = m.tokens * BYTES_PER_TOKEN / 1e9
    return (
        f"{m.step:<9} {m.tokens:>9} {gb:>6.1f} {m.rows:>11} {m.seconds:>8.1f} {m.rows / m.seconds:>10.0f} "
        f"{m.peak_mb:>8.0f}  {m.state:<10} {m.load:>5.2f}"
    )


def summary(results: list[Measure]) -> None:
    sizes = sorted({m.tokens for m in results})
    print(f"\npeak RSS, {sizes[-1]} tokens / {sizes[0]} tokens ({sizes[-1] / sizes[0]:.1f}x the tokens):")
    for step in STEPS:
        by_size = {m.tokens: m for m in results if m.step == step}
        if sizes[0] in by_size and sizes[-1] in by_size:
            small, big = by_size[sizes[0]], by_size[sizes[-1]]
            print(
                f"  {step:<9} {big.peak_mb:>8.0f} / {small.peak_mb:>6.0f} MB = {big.peak_mb / small.peak_mb:.2f}x;"
                f"  rows/s {big.rows / big.seconds:,.0f} / {small.rows / small.seconds:,.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[131072, 1114112])
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--max-rows", type=int, default=400_000, help="fit's --max-rows at every size")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="eval reads the last N tokens")
    parser.add_argument("--expansion", type=int, default=1)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the stores (deleted after each size otherwise)")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None, help="outputs of earlier runs: one table")
    parser.add_argument("--child-import", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-rate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_import is not None:
        child_import(args.child_import, args.tokens[0])
        return
    if args.summarize:  # sizes run one at a time: the last line of each output holds its measures
        results = [Measure(**m) for out in args.summarize for m in json.loads(out.read_text().splitlines()[-1])]
        print(HEADER)
        print("\n".join(line(m) for m in sorted(results, key=lambda m: (m.tokens, STEPS.index(m.step)))))
        summary(results)
        return
    if args.child_rate:
        print(f"{generation_rate():.0f}")
        return
    root = args.workdir or Path(tempfile.mkdtemp(prefix="mlsae-bench-scale-"))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"machine: {os.cpu_count()} CPUs, {mem / 1e9:.1f} GB memory; workdir {root}")
    rate = subprocess.run([sys.executable, __file__, "--child-rate"], capture_output=True, text=True, check=True)
    print(f"synthetic rows: {rate.stdout.strip()} MB/s generated; SAE expansion {args.expansion}, k {args.k}")
    print(f"fit --max-rows {args.max_rows}; eval the last {args.eval_tokens} tokens; peak MB = ru_maxrss (os.wait4)")
    print("rows: (token, layer) pairs, but tokens for import; seconds: the whole command, start-up included")
    # a child's ru_maxrss starts from its parent's resident set at the fork: this process stays small (no torch)
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB, a floor of peak MB)")
    print(HEADER, flush=True)
    results: list[Measure] = []
    for n in args.tokens:
        results += run_size(root, n, args)
    if len(args.tokens) > 1:
        summary(results)
    if args.workdir is None and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps([vars(m) for m in results]))


if __name__ == "__main__":
    main()
