"""Trainer state beside a checkpoint (for --resume) and the metrics log.

`trainer_state.pt` holds the weights, the optimiser, the dead-latent counters and the loader cursor (rows
consumed) together, written atomically, so a resume never sees weights of one step and counters of another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mlsae_cache.core.errors import StoreError

STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"


def state_exists(out: Path | str) -> bool:
    return (Path(out) / STATE_NAME).is_file()


def save_state(out: Path | str, state: dict[str, Any]) -> None:
    path = Path(out) / STATE_NAME
    tmp = path.with_name(f".{STATE_NAME}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
