"""Reading the JSON and safetensors files of another tool's SAE folder, with one-line errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mlsae_cache.core.errors import NotFoundError, StoreError


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`, part of `what` (e.g. "a SAELens SAE folder")."""
    if not path.parent.is_dir():
        raise NotFoundError(f"{path.parent} does not exist (give {what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        inside = sorted(p.parent.name for p in path.parent.glob(f"*/{path.name}"))
        if inside:
            raise StoreError(
                f"{path.parent} holds SAE folders ({', '.join(inside[:3])}, ...), not one SAE (give one of them)"
            ) from e
        raise StoreError(f"{path.parent} has no {path.name}, so it is not {what} (check --from)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path} is not valid JSON: {e} (download it again)") from e
    if not isinstance(data, dict):
        raise StoreError(f"{path} holds a {type(data).__name__}, not a JSON object (give {what})")
    return data


def read_tensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `path`, checked to be exactly `shapes` (name -> shape), as float32."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iter
    except Exception as e:  # missing, truncated or foreign file
        raise StoreError(f"cannot read {path}: {e} (download it again)") from e
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise StoreError(
            f"{path} holds {', '.join(extra)}, which a TopK SAE of mlsae has no place for (only plain TopK SAEs import)"
        )
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape) if name in tensors else "missing"
        if got != shape:
            raise StoreError(f"{path}: {name} is {got}, its config implies {shape} (download it again)")
    return {name: tensors[name].to(torch.float32) for name in shapes}
