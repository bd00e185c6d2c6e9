"""Rows per second of one full TopK SAE training step: ours beside EleutherAI sparsify's SparseCoder.

Our step: forward (standardise, encode, sparse decode), per-layer FVU + AuxK loss, backward, removal of
the decoder-parallel gradient, Adam step, decoder renormalisation, dead-latent counter update.
Sparsify's step: SparseCoder.forward (FVU + AuxK), backward, its parallel-gradient removal, the same Adam,
its renormalisation. Both see the same rows, shapes, dead-latent mask, optimiser settings and threads.

    .venv/bin/python benchmarks/train_step.py [--autocast bf16] [--dead-fraction 0.5]

sparsify is optional: `pip install --no-deps eai-sparsify einops natsort simple-parsing docstring-parser
schedulefree` (its import-time deps, leaving torch alone); without it only our figure is printed.
Sparsify's AuxK uses k_aux = d_model / 2 and does not train the encoder of dead latents; ours uses
k_aux = 256 and does (docs/METHOD.md section 4), so with --dead-fraction > 0 ours does more work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from mlsae_train.loss import AUXK_K, DeadLatentTracker
from mlsae_train.sae import SaeConfig, TopKSAE
from mlsae_train.trainer import make_optimizer, optimise

ADAM_LR = 1e-4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="rows per step")
    p.add_argument("--n-layers", type=int, default=30, help="layer ids drawn for the per-layer FVU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each, alternating")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--autocast", choices=["none", "bf16"], default="none", help="our encoder matmul dtype")
    p.add_argument("--dead-fraction", type=float, default=0.0, help="fraction of latents marked dead (AuxK)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_adam(params: object) -> torch.optim.Adam:
    """The trainer's Adam (paper settings, fused where available), for both sides."""
    return make_optimizer(params, ADAM_LR)  # type: ignore[arg-type]


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, rounds: int, device: str) -> dict:
    """Median seconds per step of each step function, timed in alternation.

    Alternating one step of each per round exposes both to the same background load, so their ratio
    stays meaningful on a shared machine even when absolute figures drift.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ours_step(args: argparse.Namespace, x: torch.Tensor, layer: torch.Tensor, dead: torch.Tensor) -> Callable:
    """Build our training step as a closure over its model, optimiser and tracker."""
    cfg = SaeConfig(args.d_model, args.d_model * args.expansion, args.k)
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    sae = TopKSAE(cfg, generator=gen, autocast_dtype=autocast).to(args.device)
    sae.init_b_dec_(x[:1024])
    opt = make_adam(sae.parameters())
    tracker = DeadLatentTracker(cfg.n_latents, device=args.device)

    def step() -> None:
        optimise(sae, opt, tracker, x, layer, args.n_layers, dead, AUXK_K)

    return step


def sparsify_step(args: argparse.Namespace, x: torch.Tensor, dead: torch.Tensor) -> Callable | str:
    """Sparsify's training step, or the reason it cannot be built."""
    try:
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder
    except Exception as e:  # any import failure means "not available"
        return f"{type(e).__name__}: {e}"
    torch.manual_seed(args.seed)
    sc = SparseCoder(args.d_model, SparseCoderConfig(expansion_factor=args.expansion, k=args.k), device=args.device)
    opt = make_adam(sc.parameters())
    mask = dead if bool(dead.any()) else None

    def step() -> None:
        out = sc(x, dead_mask=mask)
        (out.fvu + out.auxk_loss / 32).backward()
        sc.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sc.set_decoder_norm_to_unit_norm()

    return step


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    n = args.d_model * args.expansion
    # Rows with a per-row offset and scale, like residual streams of different layers.
    x = torch.randn(args.batch, args.d_model, generator=gen) * (1 + 10 * torch.rand(args.batch, 1, generator=gen))
    x = (x + torch.randn(args.batch, 1, generator=gen)).to(args.device)
    layer = torch.randint(0, args.n_layers, (args.batch,), generator=gen).to(args.device)
    dead = (torch.rand(n, generator=gen) < args.dead_fraction).to(args.device)
    print(
        f"d_model {args.d_model}, n_latents {n}, k {args.k}, batch {args.batch} rows, threads {args.threads}, "
        f"device {args.device}, dead {int(dead.sum())}/{n}, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} (figures drop on a busy machine; the ratio less)"
    )
    steps = {"ours": ours_step(args, x, layer, dead)}
    theirs_step = sparsify_step(args, x, dead)
    if isinstance(theirs_step, str):
        print(f"sparsify: not available ({theirs_step}); only our figure is shown")
    else:
        steps["sparsify"] = theirs_step
    sec = time_interleaved(steps, args.warmup, args.steps, args.device)
    ours = args.batch / sec["ours"]
    print(f"ours (encoder {args.autocast}):        {ours:10.0f} rows/s  (median of {args.steps} steps)")
    if "sparsify" in sec:
        theirs = args.batch / sec["sparsify"]
        print(f"sparsify SparseCoder (fp32): {theirs:10.0f} rows/s  (median of {args.steps} steps)")
        print(f"ratio ours/sparsify: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
