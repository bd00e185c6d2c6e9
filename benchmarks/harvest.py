"""Harvest throughput against a bare forward pass of the same model over the same batches (target >= 0.97).

Run: `.venv/bin/python benchmarks/harvest.py [--tokens 16384] [--repeats 5]`. For each model it times, on the
same window batches and in alternation (the order reversed every other repeat), (a) the transformer without hooks
and without the LM head, and (b) the whole harvest (hooks, range check, float16 conversion, statistics, Zarr
writes with checksums, the store's start-up and finish) into a temporary store; then prints the median (range) of
tokens/s of both and of the ratio of each pair of adjacent runs, and bytes on disk per token. The machine's speed
drifts over tens of seconds (the bare pass alone varies by 10-20% between runs on a 2-core VM), which the pairing
cancels where the best runs of each would not. Both run with the allocator setting harvest uses on a CPU
(`keep_freed_memory`), set once at the start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from mlsae_cache.config import HarvestConfig
from mlsae_cache.core.allocator import keep_freed_memory
from mlsae_cache.harvest import run_harvest
from mlsae_cache.models import LoadedModel, ModelInfo, base_model, find_blocks, load_model
from mlsae_cache.store import Cache
from mlsae_cache.text import TextSpec, window_batches


def pythia70m_shape(tokenizer_source: LoadedModel) -> LoadedModel:
    """A random GPT-NeoX of Pythia-70m's shape (6 layers, d_model 512), with the embedded model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tokenizer_source.tokenizer
    config = AutoConfig.for_model(
        "gpt_neox",
        vocab_size=len(tok),
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    info = ModelInfo("random-pythia-70m-shape", "random", None, None, type(model).__name__, 6, 512, "float32")
    return LoadedModel(model, tok, info)


MODELS = {"smollm2": "smollm2-135m", "pythia-shape": "pythia-70m shape (random)"}
"""--models: the embedded SmolLM2-135M, and a random GPT-NeoX of Pythia-70m's shape with SmolLM2's tokenizer."""


def time_bare(loaded: LoadedModel, batches: list[torch.Tensor]) -> float:
    body = base_model(loaded.model)
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in batches:
            body(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def time_harvest(loaded: LoadedModel, cfg: HarvestConfig) -> tuple[float, int]:
    start = time.perf_counter()
    run_harvest(cfg, loaded=loaded)
    elapsed = time.perf_counter() - start
    return elapsed, Cache(cfg.out).nbytes_stored()


def bench(loaded: LoadedModel, n_tokens: int, repeats: int, ctx: int, batch_size: int) -> dict[str, float]:
    n_batches = n_tokens // (ctx * batch_size)
    batches = [
        torch.from_numpy(b) for b in islice(window_batches(TextSpec(), loaded.tokenizer, ctx, batch_size), n_batches)
    ]
    n = sum(b.numel() for b in batches)
    time_bare(loaded, batches[:1])  # warm-up
    bare, harv, size = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            cfg = HarvestConfig(
                out=Path(tmp) / f"c{r}", max_tokens=n, context_length=ctx, batch_windows=batch_size, device="cpu"
            )
            for which in ("bare", "harvest") if r % 2 == 0 else ("harvest", "bare"):
                if which == "bare":
                    bare.append(time_bare(loaded, batches))
                else:
                    elapsed, size = time_harvest(loaded, cfg)
                    harv.append(elapsed)
            shutil.rmtree(cfg.out)  # each run writes into memory the last one's files gave back, as a long run does
    return {
        "tokens": n,
        "bare": [n / t for t in bare],
        "harvest": [n / t for t in harv],
        "paired": [b / h for b, h in zip(bare, harv, strict=True)],
        "bytes_per_token": size / n,
        "layers": loaded.info.n_layers,
    }


def median_range(values: list[float], fmt: str = ",.0f") -> str:
    """`median (min-max)`."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="which models")
    args = parser.parse_args()
    keep_freed_memory()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.repeats} repeats, "
        f"{args.tokens} tokens, context {args.context_length}, batch {args.batch_size}; load {os.getloadavg()}"
    )
    smol = load_model("smollm2-135m", device="cpu")
    rows = []
    for key in args.models:
        name, loaded = MODELS[key], smol if key == "smollm2" else pythia70m_shape(smol)
        assert len(find_blocks(loaded.model)) == loaded.info.n_layers
        r = bench(loaded, args.tokens, args.repeats, args.context_length, args.batch_size)
        rows.append((name, r))
    print(
        "| model | layers | bare forward tok/s | harvest tok/s | harvest / bare, adjacent runs | bytes/token on disk |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['layers']} | {median_range(r['bare'])} | {median_range(r['harvest'])} | "
            f"**{median_range(r['paired'], '.3f')}** | {r['bytes_per_token']:,.0f} |"
        )
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
