"""The stores behind the live explorer's tests: a tiny random model's cache (harvested from the pydoc text), an SAE
fitted on it for a few hundred rows, its latents, variance output and explorer index. Built with the library's
own functions, as the commands would build them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlsae_analyze.encode import EncodeConfig, run_encode
from mlsae_analyze.explorer.build import IndexConfig, run_index
from mlsae_analyze.variance import VarianceConfig, run_variance
from mlsae_cache.config import HarvestConfig
from mlsae_cache.harvest import run_harvest
from mlsae_train.config import TrainConfig
from mlsae_train.trainer import fit

PROMPT = "The for statement is used to iterate over the elements of a sequence."
CONTEXT_LENGTH = 64


@dataclass(frozen=True)
class LiveStores:
    model: Path
    cache: Path
    sae: Path
    latents: Path
    variance: Path
    index: Path


def make_live_stores(root: Path, model: Path) -> LiveStores:
    """Harvest, fit, encode, variance and index in `root` for the tiny model saved in `model`."""
    cache, sae, latents, variance, index = (root / n for n in ("cache", "sae", "latents", "variance", "index"))
    run_harvest(
        HarvestConfig(
            out=cache,
            model=str(model),
            context_length=CONTEXT_LENGTH,
            max_tokens=2048,
            batch_windows=8,
            chunk_tokens=256,
            device="cpu",
            dtype="float32",
        )
    )
    fit(TrainConfig(cache=cache, out=sae, expansion_factor=4, k=4, batch_rows=256, max_rows=6000, device="cpu"))
    run_encode(EncodeConfig(sae, cache, latents, device="cpu"))
    run_variance(VarianceConfig(latents, variance))
    run_index(IndexConfig(latents, index, variance, sae, model=str(model)))
    return LiveStores(model, cache, sae, latents, variance, index)
