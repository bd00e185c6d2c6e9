"""Evaluation of a trained SAE over cache rows (METHOD.md section 5): per-layer FVU, MSE, L0, dead fraction.

FVU here is dataset-level and in raw units: per layer, sum ||x - x^||^2 / sum ||x - m||^2 with m the
per-dimension mean of that layer's evaluated rows (accumulated in float64 as sums, so it streams).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch

from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import InputError
from mlsae_cache.store import Cache
from mlsae_train.checkpoint import load_sae
from mlsae_train.results import EvalResult
from mlsae_train.sae import TopKSAE
from mlsae_train.splice import SpliceConfig, splice_evaluate


class _LayerSums:
    def __init__(self, d_model: int) -> None:
        self.n, self.err, self.sq, self.l0 = 0, 0.0, 0.0, 0.0
        self.sum = np.zeros(d_model)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor) -> None:
        x64 = x.double()
        self.n += x.shape[0]
        self.err += float((x64 - x_hat.double()).pow(2).sum())
        self.sq += float(x64.pow(2).sum())
        self.sum += x64.sum(0).numpy()
        self.l0 += float((values > 0).sum())

    def fvu(self) -> float:
        den = self.sq - float(self.sum @ self.sum) / self.n
        return self.err / den if den > 0 else float("nan")


def check_compatible(sae: TopKSAE, cache: Cache, layers: tuple[int, ...]) -> None:
    if sae.cfg.d_model != cache.d_model:
        raise InputError(
            f"the SAE has d_model {sae.cfg.d_model} but cache {cache.path} has {cache.d_model} "
            "(evaluate on a cache of the model it was trained on)"
        )
    missing = [layer for layer in layers if layer not in cache.layers]
    if missing:
        raise InputError(f"layers {missing} are not in cache {cache.path} (it holds {list(cache.layers)})")


@torch.no_grad()
def evaluate(
    sae: TopKSAE,
    cache: Cache,
    layers: tuple[int, ...],
    start: int = 0,
    stop: int | None = None,
    batch_tokens: int = 4096,
    progress: Callable[[int], None] = lambda n: None,
) -> EvalResult:
    """Metrics of `sae` on the trainable rows of tokens [start, stop) at `layers`."""
    check_compatible(sae, cache, layers)
    stop = cache.n_tokens if stop is None else min(stop, cache.n_tokens)
    if not 0 <= start < stop:
        raise InputError(f"token range [{start}, {stop}) is empty (the cache has {cache.n_tokens} tokens)")
    device = sae.b_dec.device
    trainable = cache.trainable()
    sums = [_LayerSums(cache.d_model) for _ in layers]
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool, device=device)
    for a in range(start, stop, batch_tokens):
        b = min(a + batch_tokens, stop)
        mask = trainable[a:b]
        for slot, layer in enumerate(layers):
            x = torch.from_numpy(cache.activations(a, b, cache.layer_index(layer))[mask]).to(device)
            if len(x) == 0:
                continue
            out = sae(x)
            fired[out.indices[out.values > 0]] = True
            sums[slot].add(x.cpu(), out.x_hat.cpu(), out.values.cpu())
        progress(b - a)
    if sum(s.n for s in sums) == 0:
        raise InputError(f"no trainable token in [{start}, {stop}) of {cache.path}")
    fvu = [s.fvu() for s in sums]
    return EvalResult(
        layer=list(layers),
        fvu=cast("list[float | None]", fvu),  # list is invariant; EvalResult.fvu also admits None
        mse=[s.err / max(s.n, 1) / cache.d_model for s in sums],
        l0=[s.l0 / max(s.n, 1) for s in sums],
        n_rows=[s.n for s in sums],
        dead_fraction=float(1 - fired.float().mean()),
        fvu_mean=float(np.nanmean(fvu)),
    )


@dataclass(frozen=True)
class EvalConfig:
    """Everything `mlsae-train eval` takes; CLI options map one-to-one onto these fields.

    sae, cache: the checkpoint and the cache of the rows; out: write the result as JSON there (None: do not);
    start, stop: the token range; layers: the layers to evaluate (None: the SAE's); splice: also delta CE and KL
    by splicing (model, dataset, max_windows, batch_windows: see SpliceConfig).
    """

    sae: Path
    cache: Path
    out: Path | None = None
    start: int = 0
    stop: int | None = None
    layers: tuple[int, ...] | None = None
    device: str = "auto"
    splice: bool = False
    model: str | None = None
    dataset: str | None = None
    max_windows: int | None = None
    batch_windows: int = 8

    def __post_init__(self) -> None:
        self.splice_config().check_used(self.splice)  # also validates the range and window options

    def splice_config(self) -> SpliceConfig:
        return SpliceConfig(self.model, self.dataset, self.start, self.stop, self.max_windows, self.batch_windows)


def run_eval(
    cfg: EvalConfig,
    progress: Callable[[int], None] = lambda n: None,
    splice_progress: Callable[[int], None] = lambda n: None,
) -> EvalResult:
    """Evaluate cfg.sae on cfg.cache (tokens done go to `progress`, windows spliced to `splice_progress`) and
    write the result to cfg.out when given."""
    sae, sae_cfg = load_sae(cfg.sae, resolve_device(cfg.device))
    cache = Cache(cfg.cache)
    layers = cfg.layers or tuple(sae_cfg.get("layers") or cache.layers)
    result = evaluate(sae, cache, layers, cfg.start, cfg.stop, progress=progress)
    if cfg.splice:
        result = result.with_splice(splice_evaluate(sae, cache, layers, cfg.splice_config(), progress=splice_progress))
    result = replace(result, sae=str(cfg.sae), cache=str(cfg.cache), start=cfg.start, stop=cfg.stop)
    if cfg.out is not None:
        result.write(cfg.out)
    return result
