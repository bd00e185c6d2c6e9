"""Training: one TopK SAE on shuffled (token, layer) rows of a cache (METHOD.md sections 3-4).

The loop reads top to bottom: a run is prepared (fresh or resumed), then each step is forward, loss, backward,
decoder-gradient projection, Adam, decoder renormalisation, dead-latent bookkeeping; metrics are logged as JSON
lines and the state is checkpointed at intervals and at the end.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mlsae_cache.errors import InputError, StoreError
from mlsae_cache.models import resolve_device
from mlsae_cache.store import Cache
from mlsae_train.checkpoint import save_sae
from mlsae_train.config import TrainConfig
from mlsae_train.loader import Batch, LoaderConfig, RowLoader
from mlsae_train.loss import DeadLatentTracker, auxk_loss, fvu_per_layer, l0, total_loss
from mlsae_train.sae import SaeConfig, TopKSAE
from mlsae_train.state import METRICS_NAME, load_state, save_state, state_exists, truncate_metrics

log = logging.getLogger(__name__)

ADAM = {"betas": (0.9, 0.999), "eps": 6.25e-10}  # the paper's Adam (METHOD.md section 4)


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with the paper's settings; the fused kernel where this torch has it for the device."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **ADAM)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, **ADAM)


class StepMetrics(NamedTuple):
    fvu: float
    fvu_per_layer: list[float]
    l0: float
    dead_fraction: float
    auxk: float


@dataclass
class Run:
    """Everything a training loop mutates, and where it stands."""

    cfg: TrainConfig
    cache: Cache
    layers: tuple[int, ...]
    sae: TopKSAE
    optimizer: torch.optim.Adam
    tracker: DeadLatentTracker
    loader: RowLoader
    rows: int = 0
    step: int = 0

    @property
    def target_rows(self) -> int:
        return self.cfg.max_rows or self.loader.rows_per_epoch


@dataclass(frozen=True)
class FitResult:
    out: Path
    rows: int
    steps: int
    final: dict[str, Any]


def open_cache(cfg: TrainConfig) -> tuple[Cache, tuple[int, ...]]:
    cache = Cache(cfg.cache)
    if not cache.meta.complete:
        raise StoreError(
            f"cache {cfg.cache} is incomplete ({cache.n_tokens} tokens committed); finish it first by "
            "re-running the same `mlsae-cache harvest` command"
        )
    layers = cfg.layers if cfg.layers is not None else cache.layers
    return cache, tuple(sorted(layers))


def run_record(cfg: TrainConfig, cache: Cache, layers: tuple[int, ...], sae_cfg: SaeConfig) -> dict[str, Any]:
    """What cfg.json records beside the architecture, and what a resume must match."""
    return {
        **cfg.hyperparameters(),
        "layers": list(layers),
        "n_layers": len(layers),
        "cache_fingerprint": cache.meta.fingerprint,
        "cache_path": str(cfg.cache),
        "model": cache.meta.model.get("name"),
        "hook": cache.meta.hook,
        "n_latents": sae_cfg.n_latents,
    }


def check_out(cfg: TrainConfig, record: dict[str, Any]) -> dict[str, Any] | None:
    """OUT must be new, empty, or (with --resume) a run of the same cache and hyperparameters, whose saved
    trainer state is returned (None when there is none to continue from)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT {out} is a file (choose a directory)")
    busy = out.is_dir() and any(out.iterdir())
    if not cfg.resume or not state_exists(out):
        # --resume of a run killed before its first checkpoint starts it again; only its log can be there
        only_log = cfg.resume and all(p.name == METRICS_NAME for p in out.iterdir()) if busy else True
        if busy and not only_log:
            raise InputError(
                f"OUT {out} already holds files of another run (use --resume to continue it, or choose a new OUT)"
            )
        return None
    state = load_state(out)
    saved = state["record"]
    diffs = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in record.items() if k != "cache_path" and saved.get(k) != v]
    if diffs:
        raise InputError(
            f"--resume: {out} was trained with other settings ({'; '.join(diffs)}); resume with the "
            "same cache and options, or choose a new OUT"
        )
    return state


def prepare(cfg: TrainConfig) -> tuple[Run, dict[str, Any]]:
    cache, layers = open_cache(cfg)
    device = resolve_device(cfg.device)
    sae_cfg = SaeConfig(cache.d_model, cfg.expansion_factor * cache.d_model, cfg.k, cfg.standardize)
    loader_cfg = LoaderConfig(cfg.batch_rows, cfg.block_units, cfg.seed)
    loader = RowLoader(cache, layers, loader_cfg, device, stop_token=cfg.train_tokens)
    record = run_record(cfg, cache, layers, sae_cfg)
    state = check_out(cfg, record)
    autocast = torch.bfloat16 if cfg.autocast == "bf16" else None
    sae = TopKSAE(sae_cfg, torch.Generator().manual_seed(cfg.seed), autocast_dtype=autocast).to(device)
    optimizer = make_optimizer(sae.parameters(), cfg.lr)
    tracker = DeadLatentTracker(sae_cfg.n_latents, device)
    run = Run(cfg, cache, layers, sae, optimizer, tracker, loader)
    if cfg.resume and state is None:
        log.warning("%s holds no checkpoint yet: starting the run from the beginning", cfg.out)
        truncate_metrics(Path(cfg.out) / METRICS_NAME, 0)
    elif state is not None:
        sae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        tracker.load_state_dict(state["tracker"])
        run.rows, run.step = state["rows"], state["step"]
        truncate_metrics(Path(cfg.out) / METRICS_NAME, run.step)
    return run, record


def optimise(
    sae: TopKSAE,
    optimizer: torch.optim.Optimizer,
    tracker: DeadLatentTracker,
    x: torch.Tensor,
    layer: torch.Tensor,
    n_layers: int,
    dead: torch.Tensor,
    k_aux: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step (METHOD.md sections 3-4) on rows x [B, d] of layers `layer` [B], with dead latents
    `dead` [n]. Returns (per-layer FVU [n_layers], L_fvu, L_aux, values [B, k]), detached."""
    out = sae(x)
    per_layer = fvu_per_layer(out.x_std, out.x_hat_std, layer, n_layers)
    l_fvu = per_layer[~per_layer.isnan()].mean()
    # AuxK: dead latents regress the residual, in the same standardised space (METHOD.md section 4).
    l_aux = auxk_loss(out.x_std - out.x_hat_std, out.pre_acts, dead, sae.W_dec, k_aux) if k_aux else l_fvu.new_zeros(())
    total_loss(l_fvu, l_aux).backward()
    sae.remove_gradient_parallel_to_decoder_()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.set_decoder_norm_()
    tracker.update_(out.indices, x.shape[0], out.values)
    return per_layer.detach(), l_fvu.detach(), l_aux.detach(), out.values.detach()


def train_step(run: Run, batch: Batch) -> StepMetrics:
    """One optimiser step on a batch; returns its metrics (floats: a CPU-GPU sync point)."""
    dead = run.tracker.dead_mask(run.cfg.dead_after_rows)
    per_layer, l_fvu, l_aux, values = optimise(
        run.sae, run.optimizer, run.tracker, batch.x, batch.layer, len(run.layers), dead, run.cfg.k_aux
    )
    run.rows += batch.x.shape[0]
    run.step += 1
    return StepMetrics(
        float(l_fvu), per_layer.cpu().tolist(), float(l0(values)), float(dead.float().mean()), float(l_aux)
    )


def checkpoint(run: Run, record: dict[str, Any]) -> None:
    """Trainer state first (weights, optimiser, counters, cursor), then the exported SAE."""
    save_state(
        run.cfg.out,
        {
            "rows": run.rows,
            "step": run.step,
            "record": record,
            "model": run.sae.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "tracker": run.tracker.state_dict(),
        },
    )
    save_sae(run.sae, run.cfg.out, {**record, "rows_trained": run.rows, "steps": run.step})


def _log_line(run: Run, m: StepMetrics, rows_per_s: float) -> dict[str, Any]:
    return {
        "step": run.step,
        "rows": run.rows,
        "fvu": m.fvu,
        # null for a layer with no row in this batch (JSON has no NaN)
        "fvu_per_layer": {
            str(layer): None if math.isnan(v) else v for layer, v in zip(run.layers, m.fvu_per_layer, strict=True)
        },
        "l0": m.l0,
        "dead_fraction": m.dead_fraction,
        "auxk": m.auxk,
        "rows_per_s": rows_per_s,
    }


def fit(cfg: TrainConfig, progress: Callable[[int, dict[str, Any]], None] = lambda n, m: None) -> FitResult:
    """Train (or resume) to `max_rows` rows (default one epoch of the cache's selected rows)."""
    run, record = prepare(cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    metrics_file = Path(cfg.out) / METRICS_NAME
    next_checkpoint = (run.rows // cfg.checkpoint_every_rows + 1) * cfg.checkpoint_every_rows
    line: dict[str, Any] = {}
    started, rows_at_start = time.perf_counter(), run.rows
    # a resumed run that already reached its target reads no data
    batches = run.loader.batches(run.rows) if run.rows < run.target_rows else iter(())
    with metrics_file.open("a") as log_file:
        for batch, _ in batches:
            if run.rows >= run.target_rows:
                break
            if run.step == 0:
                run.sae.init_b_dec_(batch.x)  # geometric median of the first batch, standardised space
            m = train_step(run, batch)
            rate = (run.rows - rows_at_start) / max(time.perf_counter() - started, 1e-9)
            line = _log_line(run, m, rate)
            if run.step % cfg.log_every_steps == 0 or run.rows >= run.target_rows:
                log_file.write(json.dumps(line) + "\n")
                log_file.flush()
            if run.rows >= next_checkpoint:
                checkpoint(run, record)
                next_checkpoint += cfg.checkpoint_every_rows
            progress(batch.x.shape[0], line)
    if not math.isfinite(line.get("fvu", 0.0)):
        log.warning("the final FVU is not finite; try a lower --lr")
    checkpoint(run, record)
    return FitResult(Path(cfg.out), run.rows, run.step, line)
