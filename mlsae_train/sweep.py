"""Sweeps: several SAEs that differ in expansion factor, k, learning rate or seed, trained on one row stream.

The members form a grid (every combination of the listed values). The loader reads and gathers each batch once
and every member takes its step on it, one after the other, so a sweep of M SAEs reads the cache once instead of
M times. Each member is a run of `fit` in its own directory OUT/<name> (`member_name`): the same cfg.json,
sae.safetensors, metrics.jsonl and trainer state, written and checkpointed by the trainer's own functions
(trainer.prepare, trainer.advance, trainer.checkpoint), so every command that takes an SAE takes a member.

A member equals the single run `fit CACHE OUT/<name>` with its expansion factor, k, lr and seed, the sweep's
other options, and `--data-seed` the sweep's data seed (default: the first seed listed): `fit` seeds its row
order with `--seed` unless `--data-seed` is given, and a sweep's members share one row order.

All members checkpoint at the same steps. Re-running the same command continues each member from its own
checkpoint (a member that a kill left one checkpoint behind the others catches up on the batches it missed, which
the stream hands out first) and leaves a finished member as it is. Every member is held in memory at once, with its
optimiser state: split a large grid into several sweeps.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mlsae_cache.core.errors import InputError, Interrupted
from mlsae_cache.core.progress import Progress, duration, no_progress
from mlsae_train.config import TrainConfig
from mlsae_train.distributed import World
from mlsae_train.kernels import DecoderKernel
from mlsae_train.trainer import FitResult, Run, advance, checkpoint, open_metrics, prepare, start_out, translated

SWEPT = ("expansion_factor", "k", "lr", "seed")
"""The settings a sweep's members differ in; each option takes a list of values, and the grid is their product."""


def member_name(expansion_factor: int, k: int, lr: float, seed: int) -> str:
    """The directory of a member inside the sweep's OUT, e.g. `x8-k32-lr0.0001-seed0`."""
    return f"x{expansion_factor}-k{k}-lr{lr:g}-seed{seed}"


@dataclass(frozen=True)
class SweepConfig:
    """Everything `mlsae-train sweep` takes: the fit options, with lists of values for those in SWEPT, and
    `data_seed`, the seed of the row order every member shares (None: the first of `seed`)."""

    cache: Path
    out: Path
    expansion_factor: tuple[int, ...] = (64,)
    k: tuple[int, ...] = (32,)
    lr: tuple[float, ...] = (1e-4,)
    seed: tuple[int, ...] = (0,)
    data_seed: int | None = None
    batch_rows: int = 4096
    max_rows: int | None = None
    layers: tuple[int, ...] | None = None
    device: str = "auto"
    overwrite: bool = False
    standardize: bool = True
    dead_after_rows: int = 10_000_000
    k_aux: int = 256
    autocast: str = "none"
    decoder_kernel: DecoderKernel = "auto"
    checkpoint_every_rows: int = 1_000_000
    log_every_steps: int = 10
    block_units: int = 32
    train_tokens: int | None = None
    reuse_buffers: bool = True
    loss_space: str = "standardized"
    lens: Path | None = None

    def __post_init__(self) -> None:
        for name in SWEPT:
            values, flag = getattr(self, name), "--" + name.replace("_", "-")
            if not values:
                raise InputError(f"{flag} lists no value (give one or more, comma-separated, e.g. {flag} 16,32)")
            twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if twice is not None:
                raise InputError(f"{flag} lists {twice!r} twice (give each value once)")
        self.members()  # each member's settings are checked as fit checks them

    def members(self) -> dict[str, TrainConfig]:
        """Name -> the TrainConfig of each member, in grid order (expansion factor, then k, lr, seed)."""
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in (*SWEPT, "out", "data_seed")}
        data_seed = self.seed[0] if self.data_seed is None else self.data_seed
        found: dict[str, TrainConfig] = {}
        for r, k, lr, seed in itertools.product(*(getattr(self, name) for name in SWEPT)):
            name = member_name(r, k, lr, seed)
            if name in found:
                raise InputError(f"--lr values that print alike ({lr:g}) would share OUT/{name} (give distinct values)")
            found[name] = TrainConfig(
                out=self.out / name, expansion_factor=r, k=k, lr=lr, seed=seed, data_seed=data_seed, **shared
            )
        return found


@dataclass(frozen=True)
class SweepResult:
    """Each member's FitResult by name (noop: it was already trained), and the rows the shared stream handed out
    in this run with the seconds it took."""

    out: Path
    members: dict[str, FitResult]
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        """Rows of the stream per second: the rate at which every member trained."""
        return self.rows / max(self.seconds, 1e-9)

    def summary(self, cache: Path) -> str:
        """A line per member (its steps and last logged FVU, L0 and dead fraction, or that it was already trained),
        then what the sweep read and how fast, and what to run next."""
        lines = []
        for name, r in self.members.items():
            fvu, l0, dead = (r.final.get(k, math.nan) for k in ("fvu", "l0", "dead_fraction"))
            done = f"already trained ({r.steps:,} steps); nothing to do" if r.noop else f"{r.steps:,} steps"
            lines.append(f"{name}: {done}" + ("" if r.noop else f", FVU {fvu:.4f}, L0 {l0:.1f}, dead {dead:.3f}"))
        trained = sum(not r.noop for r in self.members.values())
        read = f": {self.rows:,} rows read once in {duration(self.seconds)}, {self.rows_per_s:,.0f} rows/s per SAE"
        lines += [
            f"wrote {trained} of {len(self.members)} SAEs in {self.out}" + (read if trained else ""),
            f"next: mlsae-train eval {self.out}/NAME {cache} (each member is an SAE directory, as fit writes it)",
        ]
        return "\n".join(lines)


class _Member:
    """A member's run, its run record, and where this sweep found it."""

    def __init__(self, name: str, run: Run, record: dict[str, Any]) -> None:
        self.name, self.run, self.record = name, run, record
        self.step_at_start = run.saved_step = run.step
        self.line: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        return self.run.rows >= self.run.target_rows

    def result(self) -> FitResult:
        run = self.run
        noop = run.resumed and run.step == self.step_at_start
        return FitResult(Path(run.cfg.out), run.rows, run.step, self.line, noop)


def _prepare(cfg: SweepConfig) -> list[_Member]:
    """Every member, fresh or resumed (trainer.prepare); reads and checks all of them before anything is written."""
    if World.from_env().distributed:
        raise InputError("a sweep trains in one process (start `mlsae-train sweep` without torchrun)")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise InputError(f"OUT {cfg.out} is a file (choose a directory for the sweep's SAEs)")
    members: list[_Member] = []
    for name, member in cfg.members().items():
        # the members differ only in what the row stream does not depend on: they share the first one's loader
        run, record = prepare(member, loader=members[0].run.loader if members else None)
        members.append(_Member(name, run, record))
    return members


def run_sweep(cfg: SweepConfig, progress: Progress = no_progress) -> SweepResult:
    """Train (or continue) every member of the sweep to `max_rows` rows on one row stream.

    `progress(0, total=..., resumed_at=...)` counts the stream's rows; then each batch's rows, with the range of
    the members' FVU on logged steps. Ctrl-C saves a checkpoint of every member's last step and raises
    `Interrupted`; the same command continues from them."""
    members = _prepare(cfg)
    active = [m for m in members if not m.done]
    start = min((m.run.rows for m in active), default=0)
    target = members[0].run.target_rows
    progress(0, total=max(-(-target // cfg.batch_rows) * cfg.batch_rows, start), resumed_at=start)
    started = time.perf_counter()
    with ExitStack() as stack:
        for m in active:
            start_out(m.run, stack)
        rows = _train_saving_on_interrupt(active, progress)
        for m in active:  # as fit: a member with nothing left to do keeps its files as they are
            if m.run.step != m.step_at_start or not m.run.resumed:
                checkpoint(m.run, m.record)
    return SweepResult(cfg.out, {m.name: m.result() for m in members}, rows, time.perf_counter() - started)


def _train_saving_on_interrupt(active: list[_Member], progress: Progress) -> int:
    """`_train`, saving a checkpoint of each member's last step when Ctrl-C stops it."""
    try:
        return _train(active, progress)
    except KeyboardInterrupt:
        if all(m.run.step == 0 for m in active):
            raise Interrupted("interrupted before the first step; nothing was saved") from None
        for m in active:
            if m.run.step not in (0, m.run.saved_step):
                checkpoint(m.run, m.record)
        where = ", ".join(sorted({f"step {m.run.step}" for m in active}))
        raise Interrupted(
            f"interrupted; the checkpoints of {len(active)} members ({where}) are saved in "
            f"{Path(active[0].run.cfg.out).parent}: re-run the same command to continue"
        ) from None


def _train(active: list[_Member], progress: Progress) -> int:
    """The shared loop: each batch of the stream, read once, is a step of every member whose next batch it is (a
    member behind the others catches up first); returns the rows the stream handed out."""
    if not active:
        return 0
    first = active[0].run
    batch_rows, start = first.cfg.batch_rows, min(m.run.rows for m in active)
    clocks = [(time.perf_counter(), m.run.rows) for m in active]
    with ExitStack() as files:
        logs = [files.enter_context(open_metrics(m.run)) for m in active]
        for batch, position in first.loader.batches(start):
            if all(m.done for m in active):
                break
            x = translated(first, batch)  # the members share the lens, if there is one
            fvu = []
            for m, log_file, clock in zip(active, logs, clocks, strict=True):
                if m.run.rows == position - batch_rows and not m.done:
                    metrics, m.line, logged = advance(m.run, x, m.record, log_file, clock)
                    fvu += [metrics.fvu] if logged and math.isfinite(metrics.fvu) else []
            batch.release()  # every member has taken its step: the loader may refill its buffer
            shown = {"fvu": f"{min(fvu):.4g}-{max(fvu):.4g}"} if fvu else {}
            progress(batch_rows, **shown)
    return max(m.run.rows for m in active) - start
