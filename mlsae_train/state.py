"""Trainer state beside a checkpoint (for --resume) and the metrics log.

`trainer_state.pt` holds the weights, the optimiser, the dead-latent counters and the loader cursor (rows
consumed) together, written atomically, so a resume never sees weights of one step and counters of another. It
carries a crc32c of everything it holds (each tensor's bytes, dtype and shape, every other value's repr, in a fixed
order), checked when it is loaded: torch.load itself reads a changed byte of a tensor without complaint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import crc32c
import torch

from mlsae_cache.core.errors import CorruptError, StoreError
from mlsae_cache.core.outputs import replace_file

STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"
_CHECKSUM = "crc32c"


def state_exists(out: Path | str) -> bool:
    return (Path(out) / STATE_NAME).is_file()


def save_state(out: Path | str, state: dict[str, Any]) -> None:
    """Write the state atomically (core.outputs.replace_file). torch.save is given an open file, not a path: its
    own writer reports a full disk as a bare RuntimeError, while through a file the OSError stays attached."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save({**state, _CHECKSUM: _digest(state)}, f)

    replace_file(Path(out) / STATE_NAME, write)


def load_state(out: Path | str) -> dict[str, Any]:
    """The state saved in OUT, its checksum checked (a state saved before checksums were recorded loads as it is)."""
    path = Path(out) / STATE_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise StoreError(f"{path} is not a readable trainer state ({e}); start a new run without --resume") from e
    if not isinstance(state, dict):
        raise StoreError(f"{path} is not a trainer state (start a new run without --resume)")
    recorded = state.pop(_CHECKSUM, None)
    if recorded is not None and recorded != _digest(state):
        raise CorruptError(
            f"{path} is corrupted: its values do not match the crc32c saved with them (a changed byte; start a new "
            "run without --resume, or train from an earlier copy)"
        )
    return state


def _digest(value: Any, crc: int = 0) -> int:
    """crc32c of a state: tensors by dtype, shape and bytes; dicts in key order; other values by repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        crc = crc32c.crc32c(f"{t.dtype}{tuple(value.shape)}".encode(), crc)
        return crc32c.crc32c(t.view(torch.uint8).numpy() if t.numel() else b"", crc)  # type: ignore[arg-type]  # numpy gives the buffer protocol; its stubs declare it from Python 3.12
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            crc = _digest(value[key], crc32c.crc32c(repr(key).encode(), crc))
        return crc
    if isinstance(value, list | tuple):
        for item in value:
            crc = _digest(item, crc)
        return crc
    return crc32c.crc32c(repr(value).encode(), crc)


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
