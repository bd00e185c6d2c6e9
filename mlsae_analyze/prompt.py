"""Where the latents of one prompt sit over layers: the data of a single-prompt heatmap (docs/METHOD.md section 6).

The prompt is tokenised as the harvest tokenises a document (the model's separator token, then the text
without added special tokens), run through the model the cache was harvested from, and every SAE layer's
resid_post is captured. Rows follow the cache's trainable policy: position 0 (the attention-sink position,
whose activations are huge and atypical) and special tokens are skipped, so with a separator at position 0
every text token is kept. With a[l, t, j] the SAE activations of the kept tokens t:

    totals[l, j] = sum_t a[l, t, j];  P_j(l) = totals[l, j] / sum_l totals[l, j];  E[L|j] = sum_l l P_j(l),

l being the layer position 0..L-1. Only latents active somewhere in the prompt are returned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mlsae_analyze import plots
from mlsae_analyze.encode import encode_rows
from mlsae_analyze.layers import layer_distribution, layer_totals
from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import InputError
from mlsae_cache.core.outputs import check_replaceable, output_dir
from mlsae_cache.core.records import Record
from mlsae_cache.hooks import ResidCapture
from mlsae_cache.models import LoadedModel, base_model, find_blocks, load_cache_model
from mlsae_cache.store import Cache, CacheMeta
from mlsae_cache.text import token_stream
from mlsae_train.checkpoint import load_sae, resolve_sae
from mlsae_train.evaluate import check_compatible
from mlsae_train.lens import Lens, lens_of
from mlsae_train.sae import TopKSAE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptConfig:
    """A single-prompt heatmap: the SAE, the cache whose model it reads, the text; `model` overrides the
    cache's model (needed for an imported cache, which names none)."""

    sae: Path | str
    cache: Path
    out: Path
    text: str
    device: str = "auto"
    allow_unfinished: bool = False
    overwrite: bool = False
    model: str | None = None
    title: str | None = None

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a device that cannot be used is refused before any work
        if not self.text.strip():
            raise InputError("--text is empty (give the prompt to analyse)")


@dataclass(frozen=True)
class PromptLayers:
    """Per-layer activation of the latents active on the prompt.

    latents [m] latent ids; totals, probs [L, m]; layer_mean [m] (layer positions); layers: the L block
    indices; tokens: the m' kept tokens, decoded; model: the model's name.
    """

    latents: np.ndarray
    totals: np.ndarray
    probs: np.ndarray
    layer_mean: np.ndarray
    layers: tuple[int, ...]
    tokens: tuple[str, ...]
    model: str

    def record(self, text: str) -> PromptResult:
        return PromptResult(
            text=text,
            model=self.model,
            layers=list(self.layers),
            tokens=list(self.tokens),
            latents=self.latents.tolist(),
            layer_mean=self.layer_mean.tolist(),
            probs=self.probs.tolist(),
        )


@dataclass(frozen=True)
class PromptResult(Record):
    """prompt.json of `prompt-heatmap`: the prompt, its kept tokens, and P_j(l) [L][m] of its active latents."""

    FORMAT: ClassVar[str] = "mlsae-prompt"
    VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "prompt result"
    REMAKE: ClassVar[str] = "give the OUT of `mlsae-analyze prompt-heatmap`"

    text: str
    model: str
    layers: list[int]
    tokens: list[str]
    latents: list[int]
    layer_mean: list[float]
    probs: list[list[float]]


def prompt_tokens(text: str, tokenizer: Any, meta: CacheMeta) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [T] of `text` as the harvest makes them, and which are kept [T] (the cache's trainable policy)."""
    ids = next(iter(token_stream([text], tokenizer)))
    if len(ids) > meta.context_length:
        raise InputError(
            f"the text is {len(ids)} tokens long, more than the cache's context length {meta.context_length} "
            "(shorten it: activations beyond the harvested context are not what the SAE was trained on)"
        )
    keep = meta.policy.mask(ids, np.arange(len(ids)), tokenizer.all_special_ids)
    if not keep.any():
        raise InputError(f"the text {text!r} leaves no token once the untrainable ones are skipped")
    return ids, keep


def _capture(loaded: LoadedModel, layers: tuple[int, ...], ids: np.ndarray, d_model: int) -> np.ndarray:
    """resid_post of `layers` for one sequence: [T, L, d_model] float32."""
    blocks = find_blocks(loaded.model)
    if max(layers) >= len(blocks) or loaded.info.d_model != d_model:
        raise InputError(
            f"model {loaded.info.name} ({len(blocks)} blocks, d_model {loaded.info.d_model}) does not fit the SAE "
            f"(layers {list(layers)}, d_model {d_model}); pass the model the cache was harvested from"
        )
    device = next(loaded.model.parameters()).device
    capture = ResidCapture(base_model(loaded.model), blocks, layers, torch.float32)
    acts, _ = capture(torch.from_numpy(ids)[None].to(device), d_model)  # [L, T, d_model]
    return acts.transpose(0, 1).cpu().numpy()


def prompt_totals(sae: TopKSAE, acts: np.ndarray, lens: Lens | None = None) -> np.ndarray:
    """totals[l, j] = sum_t a[l, t, j] for rows acts [T, L, d_model]: shape [L, n_latents] float64 (`lens`: the
    SAE's lens lined up with the L layers; each layer's rows are translated before they are encoded)."""
    parts = [encode_rows(sae, np.ascontiguousarray(acts[:, layer]), lens, layer) for layer in range(acts.shape[1])]
    indices, values = np.stack([p[0] for p in parts], axis=1), np.stack([p[1] for p in parts], axis=1)
    return layer_totals(indices, values, sae.cfg.n_latents)[0]


def prompt_layers(cfg: PromptConfig) -> PromptLayers:
    """Run the cache's model over cfg.text and return where each active latent sits over layers."""
    sae_dir = resolve_sae(cfg.sae)  # a hub id: its local snapshot
    sae, sae_cfg = load_sae(sae_dir, resolve_device(cfg.device), cfg.allow_unfinished)
    cache = Cache(cfg.cache)
    layers = tuple(sae_cfg.get("layers") or cache.layers)
    check_compatible(sae, cache, layers)
    lens = lens_of(sae_dir, sae_cfg, sae.b_dec.device)
    loaded = load_cache_model(cache.meta.model, device=cfg.device, override=cfg.model)
    ids, keep = prompt_tokens(cfg.text, loaded.tokenizer, cache.meta)
    acts = _capture(loaded, layers, ids, sae.cfg.d_model)[keep]
    log.info("prompt: %d tokens, %d kept", len(ids), len(acts))
    totals = prompt_totals(sae, acts, lens.select(layers) if lens is not None else None)
    latents = np.flatnonzero(totals.sum(0) > 0)
    dist = layer_distribution(totals[:, latents])
    return PromptLayers(
        latents=latents,
        totals=totals[:, latents],
        probs=dist.probs,
        layer_mean=dist.mean,
        layers=layers,
        tokens=tuple(loaded.tokenizer.decode([int(i)]) for i in ids[keep]),
        model=Path(loaded.info.name).name,
    )


def prompt_title(result: PromptLayers, text: str, max_chars: int = 70) -> str:
    """Heatmap title: the model, the number of tokens used (position 0 skipped), and the start of the text."""
    excerpt = " ".join(text.split())
    excerpt = excerpt if len(excerpt) <= max_chars else excerpt[: max_chars - 1] + "…"
    return f"{result.model} MLSAE on one prompt ({len(result.tokens)} tokens, position 0 skipped)\n“{excerpt}”"


PROMPT_PNG, PROMPT_JSON = "prompt_heatmap.png", "prompt.json"


def run_prompt_heatmap(cfg: PromptConfig) -> PromptLayers:
    """Where the latents of one prompt fire over layers: OUT/prompt_heatmap.png and OUT/prompt.json."""
    inputs = {"sae": str(Path(cfg.sae).resolve()), "cache": str(Path(cfg.cache).resolve()), "text": cfg.text}
    check_replaceable(Path(cfg.out), "prompt-heatmap", inputs, cfg.overwrite)
    result = prompt_layers(cfg)
    with output_dir(cfg.out, "prompt-heatmap", inputs, cfg.overwrite) as tmp:
        title = cfg.title or prompt_title(result, cfg.text)
        plots.layer_heatmap(result.probs, result.layer_mean, result.layers, tmp / PROMPT_PNG, title)
        result.record(cfg.text).write(tmp / PROMPT_JSON)
    return result
