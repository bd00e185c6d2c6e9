"""Converting a lens of the tuned-lens library into an mlsae lens (`mlsae-train import-lens`).

The library saves a lens as a directory holding `config.json` (`base_model_name_or_path`, `d_model`,
`num_hidden_layers`, `bias`, ...) and `params.pt`, a state dict with `{i}.weight` [d, d] and `{i}.bias` [d] for
i = 0..num_hidden_layers-1: translator i maps hidden state i of the model's `output_hidden_states`, the state
*entering* block i (i = 0: the embedding output), as h + W_i h + b_i. The authors' published lens MLSAEs use the
library's pretrained lenses and apply translator l to the output of block l, one block early.

    --indexing shifted     block l <- translator l + 1 (what the library trained it for); the last block, whose
                           output the model unembeds itself, gets the identity
    --indexing reference   block l <- translator l (the authors' code; only to reproduce its numbers)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlsae_cache.core.errors import InputError, NotFoundError, StoreError
from mlsae_cache.store import Cache, open_cache
from mlsae_train.lens import Lens, save_lens
from mlsae_train.outdir import clear_out

TUNED_LENS_CONFIG, TUNED_LENS_PARAMS = "config.json", "params.pt"
INDEXINGS = ("shifted", "reference")


@dataclass(frozen=True)
class ImportLensConfig:
    """Everything `mlsae-train import-lens` takes; CLI options map one-to-one onto these fields.

    src: a tuned-lens library lens directory; cache: a cache of the lens's model (it names the model and the
    blocks the mlsae lens covers); indexing: which translator goes with which block (module docstring).
    """

    src: Path
    out: Path
    cache: Path
    indexing: str = "shifted"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.indexing not in INDEXINGS:
            raise InputError(f"--indexing {self.indexing!r} is not one of {', '.join(INDEXINGS)}")


def read_tuned_lens(src: Path) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """(config, weight [n, d, d], bias [n, d]) of a tuned-lens library lens directory."""
    if not (src / TUNED_LENS_CONFIG).is_file() or not (src / TUNED_LENS_PARAMS).is_file():
        raise NotFoundError(f"{src} holds no {TUNED_LENS_CONFIG} and {TUNED_LENS_PARAMS} (give a tuned-lens lens dir)")
    try:
        config = json.loads((src / TUNED_LENS_CONFIG).read_text(encoding="utf-8"))
        state = torch.load(src / TUNED_LENS_PARAMS, map_location="cpu", weights_only=True)
        n, d = int(config["num_hidden_layers"]), int(config["d_model"])
    except Exception as e:  # unreadable JSON or pickle, missing keys
        raise StoreError(f"{src} is not a readable tuned-lens lens: {e}") from e
    want = {f"{i}.weight" for i in range(n)} | ({f"{i}.bias" for i in range(n)} if config.get("bias", True) else set())
    if not isinstance(state, dict) or set(state) != want:
        raise StoreError(f"{src / TUNED_LENS_PARAMS} does not hold the {n} translators its config names")
    weight = torch.stack([state[f"{i}.weight"].float() for i in range(n)])
    bias = torch.stack([state[f"{i}.bias"].float() if f"{i}.bias" in state else torch.zeros(d) for i in range(n)])
    if tuple(weight.shape) != (n, d, d):
        raise StoreError(f"{src / TUNED_LENS_PARAMS} holds translators of shape {tuple(weight.shape[1:])}, not {d}x{d}")
    return config, weight, bias


def block_translators(weight: torch.Tensor, bias: torch.Tensor, blocks: tuple[int, ...], indexing: str) -> Lens:
    """The translators of the library lens (weight [n, d, d], bias [n, d]) for the outputs of `blocks`."""
    n, d = weight.shape[0], weight.shape[-1]
    shift = 1 if indexing == "shifted" else 0
    identity = (torch.zeros(d, d), torch.zeros(d))  # the last block's output needs no translator
    picked = [(weight[b + shift], bias[b + shift]) if b + shift < n else identity for b in blocks]
    return Lens(blocks, torch.stack([w for w, _ in picked]), torch.stack([b for _, b in picked]))


def _check_model(config: dict[str, Any], cache: Cache, src: Path) -> None:
    n_layers, d = cache.meta.model.get("n_layers"), cache.d_model
    if int(config["d_model"]) != d or (n_layers is not None and int(config["num_hidden_layers"]) != n_layers):
        raise InputError(
            f"lens {src} is for a model of {config['num_hidden_layers']} blocks and d_model {config['d_model']} "
            f"({config.get('base_model_name_or_path')}), but cache {cache.path} holds one of {n_layers} blocks and "
            f"d_model {d} (give a cache of the lens's model)"
        )


def import_lens(cfg: ImportLensConfig) -> Lens:
    """Convert cfg.src for the blocks of cfg.cache into an mlsae lens at cfg.out; returns it."""
    cache = open_cache(cfg.cache)
    config, weight, bias = read_tuned_lens(Path(cfg.src))
    _check_model(config, cache, Path(cfg.src))
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise InputError(f"OUT {out} exists and is not empty (choose another OUT, or pass --overwrite)")
    if out.is_dir() and cfg.overwrite:
        clear_out(out)
    lens = block_translators(weight, bias, cache.layers, cfg.indexing)
    record = {
        "model": cache.meta.model,
        "cache_fingerprint": cache.meta.fingerprint,
        "cache_path": str(cfg.cache),
        "converted_from": str(cfg.src),
        "indexing": cfg.indexing,
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "finished": True,
    }
    save_lens(lens, out, record)
    return lens
