"""SAELens' native SAE folder (`cfg.json` + `sae_weights.safetensors`, what `sae_lens.SAE.load_from_disk` reads):
written from our SAE exactly, and read back into ours for TopK SAEs.

SAELens can express our forward pass: `normalize_activations: "layer_norm"` is our standardisation (mean over d,
unbiased std, divide by std + 1e-5, undo with the row's own std and mean), `apply_b_dec_to_input` subtracts b_dec
after it, the encoder adds b_enc, and its TopK keeps the top k then applies ReLU. Its `W_enc` is [d_in, d_sae] (our
`encoder.weight` transposed). `rescale_acts_by_decoder_norm: true`, which SAE-Dashboard needs for TopK SAEs, changes
nothing for unit-norm decoder rows, so it is set only when every row has unit norm.

Import folds what ours lacks: no b_dec subtraction (b_enc += W_enc b_dec) and decoder-norm rescaling (encoder rows
and biases times the norms, decoder rows divided by them); anything else (JumpReLU, gated, standard ReLU, other
normalisations) is refused with the name of what it is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mlsae_cache.core.errors import StoreError
from mlsae_cache.core.outputs import follow_umask
from mlsae_train.interop.provenance import UNTRAINED_POSITIONS, Provenance
from mlsae_train.interop.tensors import read_json, read_tensors
from mlsae_train.sae import SaeConfig, TopKSAE

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
WHAT = "a SAELens SAE folder (cfg.json and sae_weights.safetensors)"
UNIT_NORM_TOL = 1e-4
"""Largest |norm - 1| of a decoder row for which rescale_acts_by_decoder_norm is set on export."""
SAELENS_CONFIG_VERSION = "6.0.0"
"""The SAELens version whose config layout the export follows: without one, SAELens reads the config as one
written before 6.0 and drops its metadata."""
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_NORMALISATION = {"none": False, "layer_norm": True}


def hook_name(layer: int) -> str:
    """SAELens' (TransformerLens') hook whose values are our resid_post of block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def _metadata(layer: int, prov: Provenance) -> dict[str, Any]:
    position_0 = prov.policy.get("exclude_position_0", True)
    return {
        "sae_lens_version": SAELENS_CONFIG_VERSION,
        "model_name": prov.model,
        "hook_name": hook_name(layer),
        "hook_head_index": None,
        "context_size": prov.context_size,
        "dataset_path": prov.dataset,
        "prepend_bos": False,
        "exclude_special_tokens": prov.policy.get("exclude_special_tokens", True),
        "seqpos_slice": [1, None] if position_0 else [None],
        "model_from_pretrained_kwargs": {},
        "neuronpedia_id": None,
        "mlsae_layers": list(prov.layers),
        "mlsae_trainable_policy": prov.policy,
        "mlsae_note": f"an mlsae multi-layer SAE, {UNTRAINED_POSITIONS}",
    }


def saelens_cfg(sae: TopKSAE, layer: int, prov: Provenance) -> dict[str, Any]:
    """The cfg.json of SAELens' folder for `sae` at block `layer`."""
    norms = sae.W_dec.detach().norm(dim=1)
    return {
        "architecture": "topk",
        "d_in": sae.cfg.d_model,
        "d_sae": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if sae.cfg.standardize else "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": bool((norms - 1).abs().max() <= UNIT_NORM_TOL),
        "metadata": _metadata(layer, prov),
    }


def write_saelens(sae: TopKSAE, layer: int, prov: Provenance, out: Path) -> Path:
    """Write SAELens' folder for `sae` at block `layer` to out/<hook name>/; returns that folder."""
    folder = out / hook_name(layer)
    folder.mkdir(parents=True)
    state = {name: t.detach().to("cpu", torch.float32) for name, t in sae.state_dict().items()}
    tensors = {
        "W_enc": state["encoder.weight"].T.contiguous(),
        "b_enc": state["encoder.bias"].contiguous(),
        "W_dec": state["W_dec"].contiguous(),
        "b_dec": state["b_dec"].contiguous(),
    }
    save_file(tensors, str(folder / WEIGHTS_NAME))
    follow_umask(folder / WEIGHTS_NAME)  # safetensors creates its files 0600
    text = json.dumps(saelens_cfg(sae, layer, prov), indent=2, allow_nan=False) + "\n"
    (folder / CFG_NAME).write_text(text, encoding="utf-8")
    return folder


def _architecture(cfg: dict[str, Any]) -> str:
    """SAELens' architecture name, also for configs older than 6.0 (no `architecture`, an `activation_fn`)."""
    if "architecture" in cfg:
        return str(cfg["architecture"])
    return "topk" if cfg.get("activation_fn") == "topk" else f"standard ({cfg.get('activation_fn', 'relu')})"


def _check_expressible(src: Path, cfg: dict[str, Any]) -> bool:
    """Refuse what our TopK SAE cannot express; returns whether the SAE standardises its rows."""
    arch = _architecture(cfg)
    if arch != "topk":
        raise StoreError(
            f"{src} is a SAELens {arch} SAE, which mlsae cannot express (only TopK SAEs import: `architecture: topk`)"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in _NORMALISATION:
        raise StoreError(
            f"{src} normalises its inputs with {norm!r}, which mlsae cannot express (only 'none' and 'layer_norm')"
        )
    return _NORMALISATION[norm]


def _shape(cfg: dict[str, Any], src: Path) -> SaeConfig:
    k: Any = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    try:
        return SaeConfig(int(cfg["d_in"]), int(cfg["d_sae"]), int(k), _check_expressible(src, cfg))
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{src / CFG_NAME} lacks or has an invalid d_in, d_sae or k ({e}) (check --from)") from e


def fold_saelens(tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our tensors from SAELens' TopK tensors, folding the b_dec subtraction and decoder-norm rescaling it may lack
    or have (so that latents and reconstructions equal SAELens' own)."""
    w_enc, b_enc = tensors["W_enc"].T.contiguous(), tensors["b_enc"].clone()
    w_dec, b_dec = tensors["W_dec"].clone(), tensors["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc += w_enc @ b_dec  # ours computes W_enc (x - b_dec) + b_enc
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = w_dec.norm(dim=1)
        w_enc, b_enc, w_dec = w_enc * norms[:, None], b_enc * norms, w_dec / norms[:, None]
    return {"encoder.weight": w_enc, "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec.clone()}


def read_saelens(src: Path) -> tuple[TopKSAE, dict[str, Any]]:
    """Our SAE from SAELens' folder `src`, and what its cfg.json records (layer, hook, model, the source config)."""
    cfg = read_json(src / CFG_NAME, WHAT)
    shape = _shape(cfg, src)
    d, n = shape.d_model, shape.n_latents
    want = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    tensors = read_tensors(src / WEIGHTS_NAME, want)
    sae = TopKSAE(shape)
    sae.load_state_dict(fold_saelens(tensors, cfg))
    meta = cfg.get("metadata") or {}
    hook = str(meta.get("hook_name") or cfg.get("hook_name") or "")
    found = _HOOK.match(hook)
    extra: dict[str, Any] = {"model": meta.get("model_name") or cfg.get("model_name")}
    if found:
        extra.update(layers=[int(found.group(1))], hook="resid_post")
    else:
        extra["saelens_hook"] = hook
    return sae, extra
