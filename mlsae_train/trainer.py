"""Training: one TopK SAE on shuffled (token, layer) rows of a cache (docs/METHOD.md sections 3-4).

The loop reads top to bottom: a run is prepared (fresh or resumed), then each step is forward, loss, backward,
decoder-gradient projection, Adam, decoder renormalisation, dead-latent bookkeeping; metrics are logged as JSON
lines and the state is checkpointed at intervals and at the end.

Under torchrun (distributed.py) every rank runs this same loop on its slice of each global batch; the loss, the
gradients, the dead-latent counters and the logged metrics are global (summed over ranks), so every rank takes the
same step and holds the same weights, and rank 0 alone writes OUT.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, TypedDict

import torch
from torch import nn

from mlsae_cache.core.allocator import keep_freed_memory
from mlsae_cache.core.errors import Interrupted
from mlsae_cache.core.lock import StoreLock
from mlsae_cache.core.outputs import writing
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.store import Cache, open_cache
from mlsae_train.checkpoint import save_sae
from mlsae_train.config import TrainConfig
from mlsae_train.distributed import ONE_PROCESS, World, process_group
from mlsae_train.kernels import resolve_decoder_kernel
from mlsae_train.lens import SAE_CFG_KEY, Lens, carry_lens, check_lens_fits, load_lens, sae_lens_record
from mlsae_train.loader import Batch, LoaderConfig, RowLoader
from mlsae_train.loss import DeadLatentTracker, active_mask, auxk_dead_loss, fvu_per_layer, l0, total_loss
from mlsae_train.outdir import clear_out, plan_out, resume_config
from mlsae_train.sae import SaeConfig, TopKSAE
from mlsae_train.state import METRICS_NAME, save_state, truncate_metrics

log = logging.getLogger(__name__)


class _AdamSettings(TypedDict):
    betas: tuple[float, float]
    eps: float


ADAM: _AdamSettings = {"betas": (0.9, 0.999), "eps": 6.25e-10}  # the paper's Adam (docs/METHOD.md section 4)


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with the paper's settings; the fused kernel where this torch has it for the device."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **ADAM)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, **ADAM)


class StepMetrics(NamedTuple):
    """One step's metrics: FVU in raw units (mean over the layers in the batch, and per layer), L0, the dead
    fraction, the AuxK loss, and the FVU loss in the loss's own space."""

    fvu: float
    fvu_per_layer: list[float]
    l0: float
    dead_fraction: float
    auxk: float
    loss_fvu: float


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
    world: World = ONE_PROCESS
    model: nn.Module | None = None  # what the forward goes through: the SAE, or its DistributedDataParallel wrapper
    lens: Lens | None = None  # translates the rows (positions: slots of `layers`) before the SAE sees them
    rows: int = 0
    step: int = 0
    resumed: bool = False  # from a saved trainer state
    clear_out: bool = False  # OUT holds files to remove before the first write
    saved_step: int = 0  # the step of the last checkpoint

    @property
    def target_rows(self) -> int:
        return self.cfg.max_rows or self.loader.rows_per_epoch


@dataclass(frozen=True)
class FitResult:
    """Where the SAE is, the rows and steps trained in all, the last metrics line, and whether there was nothing
    left to do (a finished run)."""

    out: Path
    rows: int
    steps: int
    final: dict[str, Any]
    noop: bool = False


def _open_cache(cfg: TrainConfig) -> tuple[Cache, tuple[int, ...]]:
    cache = open_cache(cfg.cache)
    layers = cfg.layers if cfg.layers is not None else cache.layers
    return cache, tuple(sorted(layers))


def run_record(
    cfg: TrainConfig, cache: Cache, layers: tuple[int, ...], sae_cfg: SaeConfig, lens: Lens | None = None
) -> dict[str, Any]:
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
        SAE_CFG_KEY: sae_lens_record(lens) if lens is not None else None,
    }


def _lens(cfg: TrainConfig, cache: Cache, layers: tuple[int, ...], device: torch.device) -> Lens | None:
    """The lens of `fit --lens`, checked against the cache and lined up with `layers` (None without one)."""
    if cfg.lens is None:
        return None
    lens = load_lens(cfg.lens, device)
    check_lens_fits(lens, cache, layers)
    return lens.select(layers)


def prepare(
    cfg: TrainConfig, world: World = ONE_PROCESS, loader: RowLoader | None = None
) -> tuple[Run, dict[str, Any]]:
    """The run, fresh or resumed from OUT's trainer state (which every rank reads). Reads, validates, writes
    nothing and waits for no other rank, so bad input fails alike on every rank before any collective. `loader`:
    a row stream to share (a sweep's members read one), made with cfg's loader settings; else one is made here."""
    cache, layers = _open_cache(cfg)
    device = world.device(cfg.device)
    resolve_decoder_kernel(cfg.decoder_kernel, device)  # InputError for `triton` where it cannot run
    keep_freed_memory(device)  # on a CPU, each step reuses the last one's pages (core/allocator.py)
    sae_cfg = SaeConfig(cache.d_model, cfg.expansion_factor * cache.d_model, cfg.k, cfg.standardize)
    if loader is None:
        loader_cfg = LoaderConfig(
            cfg.batch_rows,
            cfg.block_units,
            cfg.row_seed,
            rank=world.rank,
            world_size=world.world_size,
            reuse_buffers=cfg.reuse_buffers,
        )
        loader = RowLoader(cache, layers, loader_cfg, device, stop_token=cfg.train_tokens)
    lens = _lens(cfg, cache, layers, device)
    record = run_record(cfg, cache, layers, sae_cfg, lens)
    state, clear = plan_out(cfg, record)
    autocast = torch.bfloat16 if cfg.autocast == "bf16" else None
    sae = TopKSAE(sae_cfg, torch.Generator().manual_seed(cfg.seed), autocast, cfg.decoder_kernel).to(device)
    optimizer = make_optimizer(sae.parameters(), cfg.lr)
    tracker = DeadLatentTracker(sae_cfg.n_latents, device)
    run = Run(cfg, cache, layers, sae, optimizer, tracker, loader, world, clear_out=clear, lens=lens)
    if state is not None:
        sae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        tracker.load_state_dict(state["tracker"])
        run.rows, run.step, run.resumed = state["rows"], state["step"], True
    return run, record


def start_out(run: Run, stack: ExitStack) -> None:
    """Rank 0 makes OUT, holds its writer lock until the run ends (a second fit into it is refused, and readers can
    tell an unfinished checkpoint that is being trained), empties it when the plan says so, and drops log lines
    written after the checkpoint that the run continues from."""
    if not run.world.is_main:
        return
    out = Path(run.cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stack.enter_context(StoreLock(out))
    stack.enter_context(writing(out))  # a full disk (checkpoint or log) is reported naming OUT
    if run.clear_out:
        clear_out(out)
    if run.lens is not None:
        carry_lens(run.lens, out)  # before the first checkpoint, whose cfg.json names it
    if run.resumed:
        log.info("continuing the run in %s at %d rows", out, run.rows)
        truncate_metrics(out / METRICS_NAME, run.step)


class StepLoss(NamedTuple):
    """The losses of one step. fvu_loss: per-layer FVU [n_layers] in the loss's space (standardised or raw);
    fvu_raw: per-layer FVU in raw units, what `eval` reports (detached); l_fvu: their mean in the loss's space;
    l_aux: the AuxK loss; out: the SAE's ForwardOutput. In a data-parallel run, this rank's shares."""

    fvu_loss: torch.Tensor
    fvu_raw: torch.Tensor
    l_fvu: torch.Tensor
    l_aux: torch.Tensor
    out: Any


def optimise(
    sae: TopKSAE,
    optimizer: torch.optim.Optimizer,
    tracker: DeadLatentTracker,
    x: torch.Tensor,
    layer: torch.Tensor,
    n_layers: int,
    dead: torch.Tensor,
    k_aux: int,
    world: World = ONE_PROCESS,
    model: nn.Module | None = None,
    loss_space: str = "standardized",
    measure_raw: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step (docs/METHOD.md, sections 3-4) on rows x [B, d] of layers `layer` [B], with dead latents
    `dead` [n]. Returns (per-layer FVU in raw units [n_layers], NaN unless measured, L_fvu, L_aux, values [B, k]),
    detached; in a data-parallel run x is this rank's slice of the batch, `model` wraps `sae`, and the losses are
    this rank's shares."""
    loss = step_loss(sae, x, layer, n_layers, dead, k_aux, world, model, loss_space, measure_raw)
    total_loss(loss.l_fvu, loss.l_aux).backward()  # in a data-parallel run, returns with gradients summed over ranks
    sae.remove_gradient_parallel_to_decoder_()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.set_decoder_norm_()
    fired = world.any_(active_mask(loss.out.indices, sae.cfg.n_latents, loss.out.values))
    tracker.advance_(x.shape[0] * world.world_size, fired)
    return loss.fvu_raw, loss.l_fvu.detach(), loss.l_aux.detach(), loss.out.values.detach()


def step_loss(
    sae: TopKSAE,
    x: torch.Tensor,
    layer: torch.Tensor,
    n_layers: int,
    dead: torch.Tensor,
    k_aux: int,
    world: World = ONE_PROCESS,
    model: nn.Module | None = None,
    loss_space: str = "standardized",
    measure_raw: bool = True,
) -> StepLoss:
    """Forward and losses of one step, each loss this rank's share of the global batch's (the whole loss in one
    process). The FVU loss is computed in `loss_space`; beside it the raw-unit FVU, which costs a pass over the
    batch in the standardised space and so is measured only when `measure_raw` (NaN otherwise)."""
    out = (sae if model is None else model)(x, dead if k_aux else None)  # with the dead latents' pre-activations
    reduce = world.all_reduce
    if loss_space == "raw":
        fvu_loss = fvu_per_layer(x.to(out.x_std.dtype), out.x_hat, layer, n_layers, all_reduce=reduce)
        fvu_raw = fvu_loss.detach()
    else:
        fvu_loss = fvu_per_layer(out.x_std, out.x_hat_std, layer, n_layers, all_reduce=reduce)
        if measure_raw:
            with torch.no_grad():
                fvu_raw = fvu_per_layer(x.to(out.x_std.dtype), out.x_hat, layer, n_layers, all_reduce=reduce)
        else:
            fvu_raw = torch.full((n_layers,), math.nan, device=x.device)
    l_fvu = fvu_loss[~fvu_loss.isnan()].mean()
    # AuxK: dead latents regress the residual, in the standardised space (docs/METHOD.md, section 4); the residual
    # is not formed when no latent is dead (auxk_dead_loss is then 0 whatever it gets)
    residual = out.x_std - out.x_hat_std if out.dead_ids.numel() else out.x_std
    l_aux = auxk_dead_loss(residual, out.dead_pre, out.dead_ids, sae.W_dec, k_aux, all_reduce=reduce)
    return StepLoss(fvu_loss, fvu_raw, l_fvu, l_aux, out)


def train_step(run: Run, batch: Batch, measure_raw: bool = True) -> StepMetrics:
    """One optimiser step on a batch; returns its metrics (floats: a CPU-GPU sync point), the FVU in raw units
    NaN unless `measure_raw`."""
    dead = run.tracker.dead_mask(run.cfg.dead_after_rows)
    fvu_raw, l_fvu, l_aux, values = optimise(
        run.sae,
        run.optimizer,
        run.tracker,
        batch.x,
        batch.layer,
        len(run.layers),
        dead,
        run.cfg.k_aux,
        run.world,
        run.model,
        run.cfg.loss_space,
        measure_raw,
    )
    run.rows += run.cfg.batch_rows
    run.step += 1
    # global values: each rank holds its share of the losses, and l0 over an equal slice of the rows
    shares = [fvu_raw, l_fvu[None], l_aux[None], l0(values)[None] / run.world.world_size]
    summed = run.world.sum_(torch.cat([t.float() for t in shares])).cpu().tolist()
    n = len(run.layers)
    per_layer = summed[:n]
    present = [v for v in per_layer if not math.isnan(v)]
    fvu = sum(present) / len(present) if present else math.nan
    return StepMetrics(fvu, per_layer, summed[n + 2], float(dead.float().mean()), summed[n + 1], summed[n])


def init_b_dec(run: Run, x: torch.Tensor) -> None:
    """b_dec = geometric median of the first batch, standardised space; in a data-parallel run of the global batch
    (the ranks' slices in rank order are exactly the single-process batch), then rank 0's value everywhere."""
    run.sae.init_b_dec_(run.world.gather_rows(x.to(run.sae.b_dec.dtype)))
    run.world.broadcast_(run.sae.b_dec.data)


def checkpoint(run: Run, record: dict[str, Any]) -> None:
    """Trainer state first (weights, optimiser, counters, cursor), then the exported SAE, marked finished once the
    run has reached its target; rank 0 only (every rank holds the same state)."""
    if not run.world.is_main:
        return
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
    finished = run.rows >= run.target_rows
    save_sae(run.sae, run.cfg.out, {**record, "rows_trained": run.rows, "steps": run.step, "finished": finished})
    run.saved_step = run.step


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
        "loss_fvu": m.loss_fvu,
        "rows_per_s": rows_per_s,
    }


def fit(cfg: TrainConfig, progress: Progress = no_progress) -> FitResult:
    """Train (or continue) to `max_rows` rows (default one epoch of the cache's selected rows); under torchrun, as
    one rank of a data-parallel run (`progress` is called on every rank, with the global rows of each step).

    `progress(0, total=..., resumed_at=...)` comes first, then the rows of each step with its FVU, L0 and dead
    fraction (the FVU on logged steps only). Ctrl-C saves a checkpoint of the last step and raises `Interrupted`
    saying so; the same command continues from it."""
    if cfg.resume:
        cfg = resume_config(cfg, given=())
    world = World.from_env()
    run, record = prepare(cfg, world)
    steps = -(-run.target_rows // cfg.batch_rows)  # the last step may pass the target
    progress(0, total=max(steps * cfg.batch_rows, run.rows), resumed_at=run.rows)
    with ExitStack() as stack, process_group(world, run.sae.b_dec.device):
        run.model = world.data_parallel(run.sae)  # rank 0's weights on every rank
        world.barrier()  # every rank has read OUT (plan_out, resume state) before rank 0 writes into it
        start_out(run, stack)
        step_at_start = run.saved_step = run.step
        line = _train_saving_on_interrupt(run, record, progress)
        if not math.isfinite(line.get("fvu", 0.0)) and world.is_main:
            log.warning("the final FVU is not finite; try a lower --lr")
        # a resumed run that had nothing left to do keeps its files as they are: a re-save would give the same
        # weights a new save_id, and what was made from the checkpoint (encoded latents) would no longer match it
        if run.step != step_at_start or not run.resumed:
            checkpoint(run, record)
        world.barrier()  # no rank returns before the final checkpoint is written
        run.model = None  # free the wrapper before the process group (distributed.process_group says why)
    return FitResult(Path(cfg.out), run.rows, run.step, line, run.resumed and run.step == step_at_start)


def _train_saving_on_interrupt(run: Run, record: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """`train`, saving a checkpoint of the last step taken when Ctrl-C stops it."""
    try:
        return train(run, record, progress)
    except KeyboardInterrupt:
        if run.step == 0:
            raise Interrupted("interrupted before the first step; nothing was saved") from None
        if run.step != run.saved_step:
            checkpoint(run, record)
        raise Interrupted(
            f"interrupted at {run.rows:,} of {run.target_rows:,} rows; the checkpoint of step {run.step} is saved in "
            f"{run.cfg.out}: re-run the same command to continue"
        ) from None


def train(run: Run, record: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """The loop: steps to the target rows, logging and checkpointing at intervals; returns the last log line."""
    line: dict[str, Any] = {}
    clock = (time.perf_counter(), run.rows)
    # a resumed run that already reached its target reads no data
    batches = run.loader.batches(run.rows) if run.rows < run.target_rows else iter(())
    with open_metrics(run) as log_file:
        for batch, _ in batches:
            if run.rows >= run.target_rows:
                break
            m, line, logged = advance(run, translated(run, batch), record, log_file, clock)
            batch.release()  # the loader may refill its buffer
            shown = {"fvu": m.fvu} if logged else {}
            progress(run.cfg.batch_rows, **shown, l0=m.l0, dead=m.dead_fraction)
    return line


def open_metrics(run: Run) -> AbstractContextManager[IO[str] | None]:
    """OUT's metrics log, opened to append (rank 0; None on the other ranks)."""
    return (Path(run.cfg.out) / METRICS_NAME).open("a") if run.world.is_main else nullcontext()


def translated(run: Run, batch: Batch) -> Batch:
    """The batch as the SAE sees it: translated by the run's lens first, if it has one (before standardisation)."""
    return batch if run.lens is None else batch._replace(x=run.lens.translate(batch.x, batch.layer))


def advance(
    run: Run, batch: Batch, record: dict[str, Any], log_file: IO[str] | None, clock: tuple[float, int]
) -> tuple[StepMetrics, dict[str, Any], bool]:
    """The loop's body, shared by `fit` and a sweep (sweep.py): one step of `run` on `batch` (b_dec initialised on
    the first), its metrics line (written on logged steps: the first, every log_every_steps-th, the last) and a
    checkpoint when the step passes a multiple of checkpoint_every_rows. `clock`: the time and rows from which the
    rate is measured. Returns (metrics, line, logged); the batch is not released (a sweep steps several SAEs on it)."""
    cfg = run.cfg
    if run.step == 0:
        init_b_dec(run, batch.x)
    last = run.rows + cfg.batch_rows >= run.target_rows
    logged = run.step == 0 or (run.step + 1) % cfg.log_every_steps == 0 or last
    m = train_step(run, batch, measure_raw=logged)  # the raw-unit FVU on logged steps only
    started, rows_at_start = clock
    line = _log_line(run, m, (run.rows - rows_at_start) / max(time.perf_counter() - started, 1e-9))
    if log_file is not None and logged:
        log_file.write(json.dumps(line) + "\n")
        log_file.flush()
    every = cfg.checkpoint_every_rows
    if run.rows // every > (run.rows - cfg.batch_rows) // every:
        checkpoint(run, record)
    return m, line, logged
