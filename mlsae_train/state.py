"""Trainer state beside a checkpoint (for --resume) and the metrics log.

`trainer_state.pt` holds the weights, the optimiser, the dead-latent counters and the loader cursor (rows
consumed) together, written atomically, so a resume never sees weights of one step and counters of another.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from mlsae_cache.core.errors import StoreError
from mlsae_cache.core.outputs import replace_file

STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"


def state_exists(out: Path | str) -> bool:
    return (Path(out) / STATE_NAME).is_file()


def save_state(out: Path | str, state: dict[str, Any]) -> None:
    """Write the state atomically (core.outputs.replace_file). torch.save is given an open file, not a path: its
    own writer reports a full disk as a bare RuntimeError, while through a file the OSError stays attached."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    replace_file(Path(out) / STATE_NAME, write)


def load_state(out: Path | str) -> dict[str, Any]:
    path = Path(out) / STATE_NAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise StoreError(f"{path} is not a readable trainer state ({e}); start a new run without --resume") from e


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a resume starts from, so the log matches one run."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if _step(line) <= step]
    replace_file(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))


def _step(line: str) -> float:
    """The step of a metrics line; infinite for a blank line or one cut short (a full disk stopped its write)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf
