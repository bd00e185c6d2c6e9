"""What the index says about each latent's decoder direction W_dec[j] (unit norm, in the SAE's standardised space):
its nearest latents by cosine, and its logit effects.

Logit effects: the direction passed through the model's final norm and unembedding, U (norm(d) - norm(0)), that is
the logits a final residual made of the direction alone would give, less the norm's bias; the top and bottom
tokens. Only the final norm and the unembedding are loaded: the model is built on the meta device from its
config, and just those tensors are read from its safetensors files (a model that has none, such as a GGUF file,
is loaded whole once instead).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlsae_analyze.explorer.index import LogitEffects
from mlsae_cache.core.errors import NotFoundError
from mlsae_cache.models import EMBEDDED, convert_embedded, default_model_cache, find_final_norm, load_model

log = logging.getLogger(__name__)

BLOCK_LATENTS = 256
"""Directions multiplied at once: [block, vocabulary] float32 logits (50 MB for a vocabulary of 49k)."""


@torch.no_grad()
def similar_latents(W_dec: torch.Tensor, n: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each latent, the n others whose directions have the largest cosine with its own: ids [N, n] int32
    and cosines [N, n] float32, largest first (n is capped at N - 1)."""
    unit = torch.nn.functional.normalize(W_dec.float(), dim=1)
    n_latents = unit.shape[0]
    n = min(n, n_latents - 1)
    ids, cos = np.zeros((n_latents, n), np.int32), np.zeros((n_latents, n), np.float32)
    for a in range(0, n_latents, block):
        sims = unit[a : a + block] @ unit.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + a] = -torch.inf
        top = sims.topk(n, dim=1)
        ids[a : a + block], cos[a : a + block] = top.indices.numpy(), top.values.numpy()
    return ids, cos


@dataclass(frozen=True)
class Unembedding:
    """A model's final norm (with its weights) and unembedding matrix [vocabulary, d_model], float32 on CPU."""

    norm: nn.Module
    weight: torch.Tensor
    model: str


@torch.no_grad()
def logit_effects(unembedding: Unembedding, W_dec: torch.Tensor, n: int) -> LogitEffects:
    """The n tokens each direction promotes most and least, with their logits (module docstring): [N, n] each."""
    zero = unembedding.norm(torch.zeros(1, W_dec.shape[1]))
    n = min(n, unembedding.weight.shape[0])
    parts: list[list[np.ndarray]] = [[], [], [], []]
    for a in range(0, W_dec.shape[0], BLOCK_LATENTS):
        logits = (unembedding.norm(W_dec[a : a + BLOCK_LATENTS].float()) - zero) @ unembedding.weight.T
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        for part, t in zip(parts, (top.indices, top.values, bottom.indices, bottom.values), strict=True):
            part.append(t.numpy())
    pos_t, pos_v, neg_t, neg_v = (np.concatenate(p) for p in parts)
    return LogitEffects(pos_t.astype(np.int32), pos_v, neg_t.astype(np.int32), neg_v)


def _model_dir(spec: str, revision: str | None) -> Path:
    """A local directory holding the model's config and weights (the embedded model is converted once)."""
    if spec in EMBEDDED:
        return convert_embedded(spec, default_model_cache())
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors"]
        return Path(snapshot_download(spec, revision=revision, allow_patterns=patterns))
    except Exception as e:  # the hub raises many kinds (offline, unknown repo, gated)
        raise NotFoundError(
            f"could not find model {spec!r} ({type(e).__name__}); give a local model directory with --model, "
            "or build the index without logit effects with --no-logits"
        ) from e


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            files.update(dict.fromkeys(f.keys(), file))
    return files


def _read(files: dict[str, Path], name: str) -> torch.Tensor | None:
    from safetensors import safe_open

    if name not in files:
        return None
    with safe_open(str(files[name]), "pt") as f:
        return f.get_tensor(name).float()


def _parts(model: nn.Module) -> tuple[nn.Module, str, str, str | None]:
    """The final norm, its name, the unembedding's weight name, and the embedding's (for tied weights)."""
    names = {id(m): name for name, m in model.named_modules()}
    norm, head = find_final_norm(model), model.get_output_embeddings()  # type: ignore[operator]
    text_config: Any = model.config.get_text_config()  # type: ignore[operator, union-attr]
    tied = names[id(model.get_input_embeddings())] + ".weight" if text_config.tie_word_embeddings else None  # type: ignore[operator]
    return norm, names[id(norm)], names[id(head)] + ".weight", tied


def _load_selected(directory: Path) -> tuple[nn.Module, torch.Tensor] | None:
    """The final norm and the unembedding read alone from the safetensors files; None where they are not there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    norm, norm_name, head_name, tied_name = _parts(model)
    files = _tensor_files(directory)
    weight = _read(files, head_name)
    if weight is None and tied_name is not None:
        weight = _read(files, tied_name)
    params = {name: _read(files, f"{norm_name}.{name}") for name, _ in norm.named_parameters()}
    if weight is None or any(v is None for v in params.values()):
        return None
    norm.to_empty(device="cpu")
    norm.load_state_dict(params)
    return norm.float().eval(), weight


def load_unembedding(spec: str, revision: str | None = None, gguf_file: str | None = None) -> Unembedding:
    """The final norm and unembedding of model `spec` (the embedded name, a local directory or a hub id)."""
    selected = None if gguf_file else _load_selected(_model_dir(spec, revision))
    if selected is None:
        log.info("loading %s whole for its final norm and unembedding", spec)
        loaded = load_model(spec, gguf_file=gguf_file, revision=revision, device="cpu", compute_dtype="float32")
        norm, _, _, _ = _parts(loaded.model)
        selected = (norm.float().eval(), loaded.model.get_output_embeddings().weight.detach().float())  # type: ignore[operator]
    norm, weight = selected
    return Unembedding(norm, weight, spec)
