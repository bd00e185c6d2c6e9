"""What a `fit` does with its OUT, decided before any step: start afresh, continue the run it holds, or refuse.

The same command continues an unfinished run (as `harvest` and `encode` do) and does nothing for a finished one;
a run of other settings is refused unless `--overwrite` replaces it. `--resume` continues the run with its own
settings, so the options need not be retyped: only those in CHANGEABLE may differ (train longer, checkpoint or log
at other intervals, another device or decoder kernel). While a fit trains, it holds OUT's writer lock, so a second
fit into the same OUT is refused and readers can tell a checkpoint that is still being trained.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

from mlsae_cache.core.errors import InputError
from mlsae_train.config import TrainConfig
from mlsae_train.state import METRICS_NAME, load_state, state_exists

CHANGEABLE = ("max_rows", "checkpoint_every_rows", "log_every_steps", "device", "decoder_kernel", "reuse_buffers")
"""What `fit --resume` (or the same command) may change in a run: how long, how often, where; not what."""

NOT_COMPARED = ("cache_path", "max_rows")
"""Keys of the run record that may differ when a run continues (the cache is identified by its fingerprint)."""


class OutPlan(NamedTuple):
    """The trainer state to continue from (None: start afresh) and whether OUT must first be emptied."""

    state: dict[str, Any] | None
    clear: bool


def _differences(saved: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """The settings that differ; a setting a run recorded before it existed counts as its default (the row order's
    seed as the run's seed)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    defaults["data_seed"] = saved.get("seed", defaults["seed"])
    return [
        f"{k} {saved.get(k, defaults.get(k))!r} -> {v!r}"
        for k, v in record.items()
        if k not in NOT_COMPARED and saved.get(k, defaults.get(k)) != v
    ]


def plan_out(cfg: TrainConfig, record: dict[str, Any]) -> OutPlan:
    """Decide what the run does with cfg.out (see the module docstring); reads only."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT {out} is a file (choose a directory for the SAE)")
    held = [p.name for p in out.iterdir()] if out.is_dir() else []
    if not held:
        return OutPlan(None, False)
    if cfg.overwrite:
        return OutPlan(None, True)
    if not state_exists(out):
        if held == [METRICS_NAME]:  # a run killed before its first checkpoint: nothing to continue
            return OutPlan(None, True)
        raise InputError(
            f"OUT {out} is not empty and holds no mlsae training run ({', '.join(sorted(held)[:3])}, ...); "
            "choose a new or empty directory, or pass --overwrite to empty it"
        )
    state = load_state(out)
    diffs = _differences(state["record"], record)
    if diffs:
        raise InputError(
            f"OUT {out} holds a run of other settings ({'; '.join(diffs)}); re-run with its settings to continue it "
            "(or use --resume), pass --overwrite to replace it, or choose another OUT"
        )
    return OutPlan(state, False)


def resume_config(cfg: TrainConfig, given: Collection[str]) -> TrainConfig:
    """cfg with the settings of the run in cfg.out, except the CHANGEABLE ones; `given` names the options set on
    the command line or by a preset, which must agree with the run's unless they are changeable."""
    out = Path(cfg.out)
    if not state_exists(out):
        if out.is_dir() and [p.name for p in out.iterdir()] == [METRICS_NAME]:
            return cfg  # killed before its first checkpoint: plan_out starts it afresh with these settings
        raise InputError(
            f"--resume: {out} holds no training run to continue (drop --resume to start one there, or give the OUT "
            "of an earlier fit)"
        )
    saved = load_state(out)["record"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    own = {k: v for k, v in saved.items() if k in fields and k not in CHANGEABLE}
    own["layers"] = tuple(own["layers"]) if own.get("layers") is not None else None
    clash = [name for name in given if name in own and own[name] != getattr(cfg, name)]
    if clash:
        shown = "; ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)!r} (the run has {own[n]!r})" for n in clash)
        raise InputError(
            f"--resume continues {out} with its own settings, which these options change: {shown}; drop them, "
            f"or train a new run in another OUT (--resume may change only {', '.join(CHANGEABLE)})"
        )
    return dataclasses.replace(cfg, **own)


def clear_out(out: Path) -> None:
    """Empty OUT (after `plan_out` said so: --overwrite, or only a log without a checkpoint)."""
    for child in Path(out).iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
