"""Harvest throughput against a bare forward pass of the same model over the same batches (target >= 0.9).

Run: `.venv/bin/python benchmarks/harvest.py [--tokens 16384] [--repeats 3]`. For each model it times, on the
same window batches and in alternation, (a) the transformer without hooks and without the LM head, and (b) the
whole harvest (hooks, range check, float16 conversion, statistics, Zarr writes with checksums) into a temporary
store; then prints tokens/s of both, their ratio, and bytes on disk per token. The machine's speed drifts over
tens of seconds (this project's VM: the bare pass alone varies by 10-20% between runs), so besides the ratio of
the best runs it prints the ratio of each bare run to the harvest run right after it, and their median.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from mlsae_cache.config import HarvestConfig
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
            bare.append(time_bare(loaded, batches))
            cfg = HarvestConfig(
                out=Path(tmp) / f"c{r}", max_tokens=n, context_length=ctx, batch_windows=batch_size, device="cpu"
            )
            elapsed, size = time_harvest(loaded, cfg)
            harv.append(elapsed)
            shutil.rmtree(cfg.out)  # each run writes into memory the last one's files gave back, as a long run does
    return {
        "tokens": n,
        "bare": n / min(bare),
        "harvest": n / min(harv),
        "paired": sorted(b / h for b, h in zip(bare, harv, strict=True)),
        "bytes_per_token": size / n,
        "layers": loaded.info.n_layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeats}, "
        f"{args.tokens} tokens, context {args.context_length}, batch {args.batch_size}"
    )
    smol = load_model("smollm2-135m", device="cpu")
    rows = []
    for name, loaded in (("smollm2-135m", smol), ("pythia-70m shape (random)", pythia70m_shape(smol))):
        assert len(find_blocks(loaded.model)) == loaded.info.n_layers
        r = bench(loaded, args.tokens, args.repeats, args.context_length, args.batch_size)
        rows.append((name, r))
    print(
        "| model | layers | bare forward tok/s (best) | harvest tok/s (best) | ratio of bests | "
        "ratios of adjacent runs (median in bold) | bytes/token on disk |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        paired = r["paired"]
        median = statistics.median(paired)
        print(
            f"| {name} | {r['layers']} | {r['bare']:,.0f} | {r['harvest']:,.0f} | {r['harvest'] / r['bare']:.2f} | "
            f"{', '.join(f'{p:.2f}' for p in paired)} (**{median:.2f}**) | {r['bytes_per_token']:,.0f} |"
        )


if __name__ == "__main__":
    main()
