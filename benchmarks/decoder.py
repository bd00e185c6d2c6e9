"""Rows per second of the sparse decoder's forward + backward: the eager `_SparseDecode` beside the Triton kernels.

Times y = sum_j values[:, j] W_dec[indices[:, j]] and its gradients for values and W_dec (sae.py, kernels.py) at
Pythia-70m's SAE shape (d_model 512, expansion 64: n_latents 32,768, k 32, 4,096 rows) and at d_model 2048, the
two decoders alternating step by step so that both see the same background load.

    .venv/bin/python benchmarks/decoder.py [--d-models 512 2048] [--k 32] [--dtype bf16] [--repeats 20]

The Triton column needs a CUDA device and triton; elsewhere only the eager figures are printed (on CPU, the
d_model 2048 shape holds a 1 GB decoder: pass --d-models 512, or smaller shapes, on a small machine). With
--dtype bf16 the eager decoder still runs in fp32: torch's sampled_addmm, which its backward uses, has no
bfloat16 kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mlsae_train.kernels import TritonSparseDecode, triton_available

sys.path.insert(0, str(Path(__file__).parent))
from train_step import time_interleaved

from mlsae_train.sae import _SparseDecode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-models", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--expansion", type=int, default=64, help="n_latents = expansion * d_model")
    p.add_argument("--k", type=int, default=32, help="latents per row (AuxK uses 256)")
    p.add_argument("--batch", type=int, default=4096, help="rows per step")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="values, W_dec and gradients")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed steps of each decoder, alternating")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_step(
    decode: type[torch.autograd.Function], b: int, n: int, d: int, k: int, args: argparse.Namespace
) -> Callable[[], None]:
    """One forward + backward of `decode` on fixed random inputs, top-k latents of random scores per row."""
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    dtype = DTYPES[args.dtype] if decode is TritonSparseDecode else torch.float32
    indices = torch.rand(b, n, generator=gen, device=args.device).topk(k, dim=1).indices
    values = torch.rand(b, k, generator=gen, device=args.device).to(dtype).requires_grad_()
    weight = torch.randn(n, d, generator=gen, device=args.device).to(dtype).requires_grad_()
    grad = torch.randn(b, d, generator=gen, device=args.device).to(dtype)

    def step() -> None:
        values.grad = weight.grad = None
        decode.apply(values, indices, weight).backward(grad)

    return step


def main() -> None:
    args = parse_args()
    with_triton = triton_available(args.device)
    dtypes = "fp32" if args.dtype == "fp32" else "triton bf16, eager fp32"
    load = f", load average {os.getloadavg()[0]:.2f}" if args.device == "cpu" else ""
    print(
        f"device {args.device}, {dtypes}, batch {args.batch} rows, k {args.k}, expansion {args.expansion}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}{load}"
    )
    if not with_triton:
        print("triton: needs a CUDA device and the triton package; only the eager decoder is timed")
    print(f"{'d_model':>8} {'n_latents':>10} {'eager rows/s':>14} {'triton rows/s':>14} {'triton/eager':>13}")
    for d in args.d_models:
        n = args.expansion * d
        steps = {"eager": make_step(_SparseDecode, args.batch, n, d, args.k, args)}
        if with_triton:
            steps["triton"] = make_step(TritonSparseDecode, args.batch, n, d, args.k, args)
        rows = {
            name: args.batch / sec
            for name, sec in time_interleaved(steps, args.warmup, args.repeats, args.device).items()
        }
        triton_col = (
            f"{rows['triton']:14.0f} {rows['triton'] / rows['eager']:13.2f}" if with_triton else f"{'-':>14} {'-':>13}"
        )
        print(f"{d:>8} {n:>10} {rows['eager']:14.0f} {triton_col}")
        del steps
    print(f"(median of {args.repeats} forward + backward steps each)")


if __name__ == "__main__":
    main()
