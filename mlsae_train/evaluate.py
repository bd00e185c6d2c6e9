"""Evaluation of a trained SAE over cache rows (docs/METHOD.md section 5): per-layer FVU, MSE, L0, dead fraction.

FVU here is dataset-level and in raw units: per layer, sum ||x - x^||^2 / sum ||x - m||^2 with m the
per-dimension mean of that layer's evaluated rows (accumulated in float64 as sums, so it streams).

For an SAE fitted on lens-translated rows (lens.py), the SAE sees T_l(x) and its reconstruction is mapped back,
x^ = T_l^-1(sae(T_l(x)).x_hat): `fvu` and `mse` are in raw units, comparable with a plain SAE's, and `fvu_lens`
is the FVU in the lens space, the one the fit trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch

from mlsae_cache.core.allocator import keep_freed_memory
from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import InputError
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.store import Cache
from mlsae_train.checkpoint import load_sae, resolve_sae
from mlsae_train.lens import Lens, lens_of
from mlsae_train.results import EvalResult
from mlsae_train.sae import TopKSAE
from mlsae_train.splice import SpliceConfig, splice_evaluate

log = logging.getLogger(__name__)


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
            "(use a cache of the model the SAE was trained on)"
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
    progress: Progress = no_progress,
    lens: Lens | None = None,
) -> EvalResult:
    """Metrics of `sae` on the trainable rows of tokens [start, stop) at `layers`; with `lens` (lined up with
    `layers`), of the SAE on translated rows, in raw units and in the lens space (`fvu_lens`)."""
    check_compatible(sae, cache, layers)
    start, stop = cache.token_range(start, stop)
    if not 0 <= start < stop:
        raise InputError(f"token range [{start}, {stop}) is empty (the cache has {cache.n_tokens} tokens)")
    device = sae.b_dec.device
    trainable = cache.trainable()
    sums = [_LayerSums(cache.d_model) for _ in layers]
    lens_sums = [_LayerSums(cache.d_model) for _ in layers]
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool, device=device)
    progress(0, total=stop - start)
    for a in range(start, stop, batch_tokens):
        b = min(a + batch_tokens, stop)
        mask = trainable[a:b]
        for slot, layer in enumerate(layers):
            x = torch.from_numpy(cache.activations(a, b, cache.layer_index(layer))[mask]).to(device)
            if len(x) == 0:
                continue
            x_in = lens.translate(x, slot) if lens is not None else x
            out = sae(x_in)
            x_hat = out.x_hat  # formed at each access
            fired[out.indices[out.values > 0]] = True
            if lens is None:
                sums[slot].add(x.cpu(), x_hat.cpu(), out.values.cpu())
                continue
            sums[slot].add(x.cpu(), lens.untranslate(x_hat, slot).cpu(), out.values.cpu())
            lens_sums[slot].add(x_in.cpu(), x_hat.cpu(), out.values.cpu())
        progress(b - a)
    if sum(s.n for s in sums) == 0:
        raise InputError(f"no trainable token in [{start}, {stop}) of {cache.path}")
    fvu = [s.fvu() for s in sums]
    fvu_lens = [s.fvu() for s in lens_sums] if lens is not None else None
    return EvalResult(
        layer=list(layers),
        fvu=cast("list[float | None]", fvu),  # list is invariant; EvalResult.fvu also admits None
        mse=[s.err / max(s.n, 1) / cache.d_model for s in sums],
        l0=[s.l0 / max(s.n, 1) for s in sums],
        n_rows=[s.n for s in sums],
        dead_fraction=float(1 - fired.float().mean()),
        fvu_mean=float(np.nanmean(fvu)),
        fvu_lens=cast("list[float | None] | None", fvu_lens),
        fvu_lens_mean=float(np.nanmean(fvu_lens)) if fvu_lens is not None else None,
    )


@dataclass(frozen=True)
class EvalConfig:
    """Everything `mlsae-train eval` takes; CLI options map one-to-one onto these fields.

    sae, cache: the checkpoint and the cache of the rows; out: write the result as JSON there (None: do not);
    start, stop: the token range (start None: the first token the SAE's fit held out, `--train-tokens`, else 0);
    layers: the layers to evaluate (None: the SAE's); splice: also delta CE and KL by splicing (model, dataset,
    max_windows, batch_windows: see SpliceConfig).
    """

    sae: Path | str
    cache: Path
    out: Path | None = None
    start: int | None = None
    stop: int | None = None
    layers: tuple[int, ...] | None = None
    device: str = "auto"
    allow_unfinished: bool = False
    splice: bool = False
    model: str | None = None
    dataset: str | None = None
    max_windows: int | None = None
    batch_windows: int = 8

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a device that cannot be used is refused before any work
        self.splice_config().check_used(self.splice)  # also validates the range and window options

    def splice_config(self, start: int | None = None) -> SpliceConfig:
        """The splice settings, from token `start` (default: cfg.start, or 0 when that is left to the SAE)."""
        first = start if start is not None else self.start or 0
        return SpliceConfig(self.model, self.dataset, first, self.stop, self.max_windows, self.batch_windows)


def run_eval(
    cfg: EvalConfig,
    progress: Progress = no_progress,
    splice_progress: Progress = no_progress,
) -> EvalResult:
    """Evaluate cfg.sae on cfg.cache (tokens done go to `progress`, windows spliced to `splice_progress`) and
    write the result to cfg.out when given."""
    sae_dir = resolve_sae(cfg.sae)  # a hub id: its local snapshot
    sae, sae_cfg = load_sae(sae_dir, resolve_device(cfg.device), cfg.allow_unfinished)
    keep_freed_memory(sae.b_dec.device)  # on a CPU, each batch reuses the last one's pages
    cache = Cache(cfg.cache)
    layers = cfg.layers or tuple(sae_cfg.get("layers") or cache.layers)
    lens = lens_of(sae_dir, sae_cfg, sae.b_dec.device)
    lens = lens.select(layers) if lens is not None else None
    held_out = sae_cfg.get("train_tokens") if sae_cfg.get("cache_fingerprint") == cache.meta.fingerprint else None
    start = cfg.start if cfg.start is not None else held_out or 0
    if held_out and start < held_out:
        log.warning("tokens [%d, %d) were used to train the SAE: the evaluation includes them", start, held_out)
    result = evaluate(sae, cache, layers, start, cfg.stop, progress=progress, lens=lens)
    if cfg.splice:
        splice_cfg = cfg.splice_config(start)
        spliced = splice_evaluate(sae, cache, layers, splice_cfg, progress=splice_progress, lens=lens)
        result = result.with_splice(spliced)
    _, stop = cache.token_range(start, cfg.stop)
    result = replace(result, sae=str(cfg.sae), cache=str(cfg.cache), start=start, stop=stop, held_out=held_out)
    if cfg.out is not None:
        result.write(cfg.out)
    return result
