"""The training benchmarks in one run, printed side by side.

    .venv/bin/python benchmarks/train.py [--cache demo_out/cache]

1. Our full training step against EleutherAI sparsify's SparseCoder + Adam on the same shapes, batch and device
   (d_model 576, expansion 8, k 32, 4,096 rows), encoder in fp32 and in bf16 (benchmarks/train_step.py).
2. The loader's shuffled rows/s from a real SmolLM2 cache against what the step consumes, and against random
   row gathers from a raw memory-mapped copy (benchmarks/loader.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import loader as loader_bench
import train_step


def step_rates(autocast: str) -> tuple[float, float | None]:
    sys.argv = ["train_step.py", "--autocast", autocast]
    args = train_step.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d_model, generator=gen) * (1 + 10 * torch.rand(args.batch, 1, generator=gen))
    layer = torch.randint(0, args.n_layers, (args.batch,), generator=gen)
    dead = torch.zeros(args.d_model * args.expansion, dtype=torch.bool)
    steps = {"ours": train_step.ours_step(args, x, layer, dead)}
    theirs = train_step.sparsify_step(args, x, dead)
    if not isinstance(theirs, str):
        steps["sparsify"] = theirs
    sec = train_step.time_interleaved(steps, args.warmup, args.steps, args.device)
    return args.batch / sec["ours"], (args.batch / sec["sparsify"] if "sparsify" in sec else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="a SmolLM2 cache (default: harvest 16k tokens)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print("| step (d 576, n 4608, k 32, 4096 rows) | ours rows/s | sparsify rows/s | ratio |")
    print("|---|---|---|---|")
    consumed = 0.0
    for autocast in ("none", "bf16"):
        ours, theirs = step_rates(autocast)
        consumed = max(consumed, ours)
        ratio = f"{ours / theirs:.2f}" if theirs else "n/a"
        print(
            f"| encoder {'fp32' if autocast == 'none' else 'bf16'} | {ours:,.0f} | "
            f"{f'{theirs:,.0f}' if theirs else 'not installed'} | {ratio} |"
        )
    with tempfile.TemporaryDirectory() as tmp:
        cache = loader_bench.ensure_cache(args.cache, Path(tmp))
        rate, raw, batches = loader_bench.compare_with_memmap(cache, Path(tmp), 4096, 600, 32)
        q = loader_bench.shuffle_quality(cache, batches, 4096)
    print(f"\nloader on {cache.path} ({cache.n_tokens} tokens x {len(cache.layers)} layers):")
    print(
        "| loader rows/s | / fastest step's consumption | / raw memmap random gathers | layers per batch | "
        "windows per batch |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {rate:,.0f} | {rate / consumed:.1f}x ({consumed:,.0f} rows/s) | {rate / raw:.2f}x ({raw:,.0f} rows/s) "
        f"| {q['layers']:.1f} of {q['n_layers']} (i.i.d. {q['layers_iid']:.1f}) | {q['windows']:.0f} of "
        f"{q['n_windows']} (i.i.d. {q['windows_iid']:.0f}) |"
    )


if __name__ == "__main__":
    main()
