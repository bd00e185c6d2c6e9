"""End-to-end training from a cache on disk, each figure the median of interleaved repeats with its range.

    .venv/bin/python benchmarks/fit.py [--repeats 5] [--steps 12] [--k 32] [--lr 1e-4,3e-4] [--autocast none bf16]

Sweep: `run_sweep` of the members (every combination of --expansion-factor, --k, --lr and --seed, as
`mlsae-train sweep` takes them) against a separate `fit` of each member, one after another, on the same cache.
Printed per encoder dtype: a separate fit's rows/s; the sweep's rows/s per SAE (the rate of its shared row stream,
at which every member trains) and its SAE-rows/s (that times the members: rows trained, summed over the SAEs, per
second, which is also what the separate fits give one after another); and the ratio of the two SAE-rows/s, the
sweep's speed-up on the whole grid. Each repeat runs the variants back to back, in an order that alternates, so a
busy machine slows both alike; each figure is the median over repeats, with the range.

A run's rate is taken between its first and its last step (from its progress callback), so it leaves out the
start-up (opening the cache, b_dec's initialisation, the loader's first block) and the final checkpoint, which a
sweep and separate fits both pay once per SAE; metrics are logged and AuxK runs as by default.

The cache: SmolLM2-135M's shape (d_model 576) of random float16 rows, --layers layers of --tokens tokens, written as
a memory-mapped .npy and imported as `mlsae-cache import` does; or --cache DIR.

Fit against the floor (`--part fit`): `fit` from the cache (the member of the first values, AuxK and metrics on as by
default) against the floor of one step on this machine, the dense encoder product (`F.linear` with its bias, under
torch.autocast for bf16) plus `torch.topk` of the same shape and dtype (every other part of a step has a sparse
form), and against EleutherAI sparsify's SparseCoder + Adam fed from memory (eai-sparsify, installed by `make bench`;
fp32, its only CPU mode). Beside them, the product and top-k `fit` itself runs (`mlsae_train.sae.encoder_product`,
`mlsae_train.topk.topk_rows`: on a CPU faster than those, in bf16 by the product's bias and in both by the top-k),
with fit's rate over theirs (what the rest of a step costs), and those plus what any TopK step must also run, each
with fit's own kernel (the decode gather, its SDDMM, both weight-gradient sparse products on one sparse layout, a
fused Adam step); the ratio of the latter to the floor bounds what fit / floor can reach with these kernels on this
machine, and the script says whether 0.9 lies within that bound. Printed per encoder dtype: each rate's median
(range) over the interleaved repeats, and the ratios fit / floor, fit / its own product and top-k, bound / floor and
fit / sparsify taken within each repeat.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlsae_cache.importer import ImportConfig, import_array
from mlsae_train.config import TrainConfig
from mlsae_train.sweep import SweepConfig, run_sweep
from mlsae_train.trainer import fit


def synthetic_cache(root: Path, tokens: int, layers: int, d_model: int) -> Path:
    """A cache of random float16 rows [tokens, layers, d_model] (layer scales 1 to 10, as a residual stream grows),
    through a memory-mapped .npy written 4,096 tokens at a time."""
    npy = root / "acts.npy"
    mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(tokens, layers, d_model))
    rng = np.random.default_rng(0)
    scales = np.geomspace(1.0, 10.0, layers)[None, :, None]
    for a in range(0, tokens, 4096):
        n = min(4096, tokens - a)
        mm[a : a + n] = (rng.standard_normal((n, layers, d_model), dtype=np.float32) * scales).astype(np.float16)
    mm.flush()
    del mm
    import_array(ImportConfig(out=root / "cache", activations=npy))
    npy.unlink()
    return root / "cache"


class StepClock:
    """A progress callback that notes when each step ends: `rows` and `seconds` span the first step's end to the
    last's."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.rows = 0

    def __call__(self, n: int, /, **facts: Any) -> None:
        if n:
            self.rows += n if self.times else 0
            self.times.append(time.perf_counter())

    @property
    def seconds(self) -> float:
        return self.times[-1] - self.times[0]


def sweep_rows(sweep: SweepConfig, scratch: Path) -> dict[str, Callable[[], float]]:
    """The two variants of the sweep comparison, each returning SAE-rows/s: the members fitted one after another,
    and the sweep."""
    members = sweep.members()

    def separate() -> float:
        rows = seconds = 0.0
        for member in members.values():
            clock = StepClock()
            fit(replace(member, out=scratch / "fit"), progress=clock)
            rows, seconds = rows + clock.rows, seconds + clock.seconds
            shutil.rmtree(scratch / "fit")
        return rows / seconds

    def together() -> float:
        clock = StepClock()
        run_sweep(replace(sweep, out=scratch / "sweep"), progress=clock)
        shutil.rmtree(scratch / "sweep")
        return len(members) * clock.rows / clock.seconds

    return {"separate fits": separate, "sweep": together}


def step_floor(
    d_model: int, n_latents: int, k: int, batch_rows: int, autocast: str, fits: bool = False
) -> Callable[[], float]:
    """rows/s of x W_enc^T + b_enc then top-k on one batch (the median of 5 timings), in the encoder's dtype: by
    `F.linear` (under torch.autocast for bf16) and `torch.topk`, or with `fits` by the kernels `fit` runs
    (`mlsae_train.sae.encoder_product`, `mlsae_train.topk.topk_rows`)."""
    from mlsae_train.sae import encoder_product
    from mlsae_train.topk import topk_rows

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(batch_rows, d_model, generator=gen), torch.randn(n_latents, d_model, generator=gen)
    bias = torch.zeros(n_latents)
    dtype = torch.bfloat16 if autocast == "bf16" else torch.float32

    def run() -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            if fits:
                topk_rows(encoder_product(x, w, bias, dtype), k)
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bf16"):
                    z = torch.nn.functional.linear(x, w, bias)
                torch.topk(z, k, sorted=False)
            times.append(time.perf_counter() - start)
        return batch_rows / statistics.median(times)

    return run


def required_kernels(d_model: int, n_latents: int, batch_rows: int, k: int) -> Callable[[], float]:
    """rows/s of what any TopK step must run beside the floor, each with the kernel `fit` uses, on one batch (the
    median of 5 timings): the sparse decode's gather (`F.embedding_bag`), its two backward products (the SDDMM for
    the codes' gradient, the sparse product (`sparse_rows_t_matmul`) for the decoder's) and the encoder weight's, on one
    `sparse_layout`, and a fused Adam step over the four parameters. Standardisation, the loss, the biases'
    gradients, the decoder-norm projection and the bookkeeping are left out, so the floor and these together
    bound what fit / floor can reach with these kernels on this machine."""
    from mlsae_train.kernels import sparse_layout
    from mlsae_train.sae import gather_dots, sparse_rows_t_matmul
    from mlsae_train.trainer import make_optimizer

    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(batch_rows, d_model, generator=gen), torch.randn(batch_rows, d_model, generator=gen)
    params = [
        torch.nn.Parameter(torch.randn(n_latents, d_model, generator=gen)),  # encoder weight
        torch.nn.Parameter(torch.randn(n_latents, d_model, generator=gen)),  # decoder weight
        torch.nn.Parameter(torch.zeros(n_latents)),
        torch.nn.Parameter(torch.zeros(d_model)),
    ]
    optimizer = make_optimizer(params, 1e-4)
    values, indices = torch.randn(batch_rows, n_latents, generator=gen).topk(k, dim=1, sorted=False)
    values = values.abs()

    def kernels() -> None:
        layout = sparse_layout(indices, n_latents)
        torch.nn.functional.embedding_bag(indices, params[1], per_sample_weights=values, mode="sum")
        g_values = gather_dots(layout, g, params[1]).view_as(values)
        params[1].grad = sparse_rows_t_matmul(layout, values, g)
        params[0].grad = sparse_rows_t_matmul(layout, g_values, x)
        params[2].grad, params[3].grad = torch.zeros(n_latents), torch.zeros(d_model)
        optimizer.step()

    def run() -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            kernels()
            times.append(time.perf_counter() - start)
        return batch_rows / statistics.median(times)

    return run


def sparsify_rows(d_model: int, expansion: int, k: int, batch_rows: int, steps: int) -> Callable[[], float] | str:
    """rows/s of sparsify's SparseCoder + Adam on one batch held in memory, or why it cannot run."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import train_step

    args = argparse.Namespace(d_model=d_model, expansion=expansion, k=k, device="cpu", seed=0)
    x = torch.randn(batch_rows, d_model, generator=torch.Generator().manual_seed(0))
    step = train_step.sparsify_step(args, x, torch.zeros(d_model * expansion, dtype=torch.bool))
    if isinstance(step, str):
        return step

    def run() -> float:
        step()  # its first step allocates
        start = time.perf_counter()
        for _ in range(steps - 1):
            step()
        return (steps - 1) * batch_rows / (time.perf_counter() - start)

    return run


DEAD_FRACTIONS: list[float] = []
"""The dead fraction at the last step of each `fit_rows` run (AuxK runs on every step where it is above 0)."""


def fit_rows(cfg: TrainConfig) -> float:
    """rows/s of `fit` between its first and last step."""
    clock = StepClock()
    result = fit(cfg, progress=clock)
    DEAD_FRACTIONS.append(result.final["dead_fraction"])
    shutil.rmtree(cfg.out)
    return clock.rows / clock.seconds


def fit_vs_floor(args: argparse.Namespace, cache: Path, root: Path) -> None:
    """The table of `fit` against the floor of a step and against sparsify, per encoder dtype."""
    expansion, k = int(args.expansion_factor.split(",")[0]), int(args.k.split(",")[0])
    print(
        "| encoder | fit rows/s | floor rows/s | fit / floor | fit's product and top-k rows/s | fit / them | those + "
        "required kernels rows/s | its / floor: the most fit / floor can reach with them | sparsify rows/s | "
        "fit / sparsify |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for autocast in args.autocast:
        member = next(iter(sweep_config(args, cache, autocast).members().values()))
        cfg = replace(member, out=root / "fit")
        variants: dict[str, Callable[[], float]] = {
            "fit": lambda cfg=cfg: fit_rows(cfg),  # type: ignore[misc]
            "floor": step_floor(args.d_model, expansion * args.d_model, k, args.batch_rows, autocast),
            "own floor": step_floor(args.d_model, expansion * args.d_model, k, args.batch_rows, autocast, True),
            "kernels": required_kernels(args.d_model, expansion * args.d_model, args.batch_rows, k),
        }
        theirs = sparsify_rows(args.d_model, expansion, k, args.batch_rows, args.steps)
        if not isinstance(theirs, str):
            variants["sparsify"] = theirs
        interleaved(variants, 1)  # warm-up
        got = interleaved(variants, args.repeats)
        ratio = [f / s for f, s in zip(got["fit"], got["floor"], strict=True)]
        own = [f / s for f, s in zip(got["fit"], got["own floor"], strict=True)]
        # fit's own product and top-k, then the required kernels, both timed in the same repeat
        ceiling = [1.0 / (1.0 / f + 1.0 / r) for f, r in zip(got["own floor"], got["kernels"], strict=True)]
        bound = [c / f for c, f in zip(ceiling, got["floor"], strict=True)]
        if "sparsify" in got:
            vs = [f / s for f, s in zip(got["fit"], got["sparsify"], strict=True)]
            sparsify_cells = f"{median_range(got['sparsify'])} | {median_range(vs, '.2f')}"
        else:
            sparsify_cells = f"not installed ({theirs}) | -"
        print(
            f"| {'fp32' if autocast == 'none' else 'bf16'} | {median_range(got['fit'])} | "
            f"{median_range(got['floor'])} | {median_range(ratio, '.2f')} | {median_range(got['own floor'])} | "
            f"{median_range(own, '.2f')} | {median_range(ceiling)} | "
            f"{median_range(bound, '.2f')} | {sparsify_cells} |"
        )
        dead = DEAD_FRACTIONS[-len(got["fit"]) :]
        print(f"(fit's dead fraction at its last step: {median_range(dead, '.3f')}; AuxK runs where it is above 0)")
        reach = "within" if statistics.median(bound) >= 0.9 else "beyond"
        print(
            f"(0.9 of the floor is {reach} what the required kernels allow here: their bound's median is "
            f"{statistics.median(bound):.2f})"
        )


def interleaved(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each variant once per repeat, back to back, the order reversed every other repeat; its results in order."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            results[name].append(variants[name]())
    return results


def median_range(values: list[float], fmt: str = ",.0f") -> str:
    """`median (min-max)`."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=None, help="a cache (default: a synthetic SmolLM2-shaped one)")
    p.add_argument("--tokens", type=int, default=24576)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--expansion-factor", default="8")
    p.add_argument("--k", default="32")
    p.add_argument("--lr", default="1e-4,3e-4")
    p.add_argument("--seed", default="0")
    p.add_argument("--batch-rows", type=int, default=4096)
    p.add_argument(
        "--dead-after-rows",
        type=int,
        default=TrainConfig.dead_after_rows,
        help="fit's dead-latent horizon (default fit's: no latent dies in a short run). On the synthetic cache's "
        "random rows every latent fires in every batch, so AuxK never runs whatever this is; with --cache of real "
        "activations a short horizon leaves latents dead and AuxK runs (benchmarks/train_step.py --dead-fraction "
        "times a step with AuxK on a fixed dead set)",
    )
    p.add_argument("--steps", type=int, default=12, help="steps per run (the rate is over all but the first)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--autocast", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's: one per core)")
    p.add_argument("--part", nargs="+", default=["sweep", "fit"], choices=["sweep", "fit"], help="which tables")
    return p.parse_args()


def sweep_config(args: argparse.Namespace, cache: Path, autocast: str) -> SweepConfig:
    def values(text: str, kind: type) -> tuple[Any, ...]:
        return tuple(kind(v) for v in text.split(","))

    return SweepConfig(
        cache=cache,
        out=Path("unused"),
        expansion_factor=values(args.expansion_factor, int),
        k=values(args.k, int),
        lr=values(args.lr, float),
        seed=values(args.seed, int),
        batch_rows=args.batch_rows,
        max_rows=args.steps * args.batch_rows,
        dead_after_rows=args.dead_after_rows,
        checkpoint_every_rows=10**12,  # the final checkpoint only
        device=args.device,
        autocast=autocast,
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = args.cache or synthetic_cache(root, args.tokens, args.layers, args.d_model)
        print(f"cache {cache}; {args.steps} steps of {args.batch_rows} rows per run, {args.repeats} repeats")
        if "fit" in args.part:
            fit_vs_floor(args, cache, root)
        if "sweep" not in args.part:
            return
        print(
            "| encoder | members | separate fit rows/s | sweep rows/s per SAE | sweep SAE-rows/s | "
            "sweep / separate |\n|---|---|---|---|---|---|"
        )
        for autocast in args.autocast:
            cfg = sweep_config(args, cache, autocast)
            n = len(cfg.members())
            variants = sweep_rows(cfg, root)
            interleaved(variants, 1)  # warm-up: the page cache, the allocator
            got = interleaved(variants, args.repeats)
            sep, swp = got["separate fits"], got["sweep"]
            ratio = [s / f for s, f in zip(swp, sep, strict=True)]
            print(
                f"| {'fp32' if autocast == 'none' else 'bf16'} | {n} | {median_range(sep)} | "
                f"{median_range([s / n for s in swp])} | {median_range(swp)} | {median_range(ratio, '.2f')} |"
            )
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
