"""EleutherAI sparsify's SAE folder (`cfg.json` with `d_in` + `sae.safetensors`, what `SparseCoder.load_from_disk`
reads; one folder per hookpoint, `layers.<l>`, which is also how delphi finds them): written from our SAE and read
into ours.

sparsify has no input normalisation, so only an SAE trained with `--no-standardize` is exported (a standardised
one would load and give wrong latents silently). Its tensors have our names and shapes; it encodes ReLU then
top-k (the same values as our top-k then ReLU). Import refuses what ours cannot express: another activation
(groupmax), a skip connection, a transcoder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mlsae_cache.core.errors import InputError, StoreError
from mlsae_cache.core.outputs import follow_umask
from mlsae_train.interop.tensors import read_json, read_tensors
from mlsae_train.sae import SaeConfig, TopKSAE

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
WHAT = "a sparsify SAE folder (cfg.json with d_in, and sae.safetensors)"
TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
"""sparsify's tensor names, which are also ours."""
UNIT_NORM_TOL = 1e-4
_HOOKPOINT = re.compile(r"^(?:model\.)?layers\.(\d+)$")
_REFUSED = {
    "skip_connection": "has a skip connection (W_skip)",
    "transcode": "is a transcoder (it predicts another module's output)",
}


def hookpoint(layer: int) -> str:
    """sparsify's (and delphi's) name of the residual stream after block `layer` of a Hugging Face model."""
    return f"layers.{layer}"


def check_exportable(sae: TopKSAE, where: str) -> None:
    """Refuse an SAE that standardises its rows: sparsify would load it and compute wrong latents."""
    if sae.cfg.standardize:
        raise InputError(
            f"SAE {where} standardises its rows, which sparsify cannot express, so sparsify (and delphi) would "
            "compute wrong latents (export --format saelens, or train with --no-standardize)"
        )


def write_sparsify(sae: TopKSAE, layer: int, out: Path) -> Path:
    """Write sparsify's folder for `sae` at block `layer` to out/layers.<layer>/; returns that folder."""
    d, n = sae.cfg.d_model, sae.cfg.n_latents
    folder = out / hookpoint(layer)
    folder.mkdir(parents=True)
    state = sae.state_dict()
    tensors = {name: state[name].detach().to("cpu", torch.float32).contiguous() for name in TENSORS}
    save_file(tensors, str(folder / WEIGHTS_NAME))
    follow_umask(folder / WEIGHTS_NAME)  # safetensors creates its files 0600
    unit = bool((tensors["W_dec"].norm(dim=1) - 1).abs().max() <= UNIT_NORM_TOL)
    cfg = {
        "activation": "topk",
        "expansion_factor": max(n // d, 1),
        "normalize_decoder": unit,
        "num_latents": n,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d,
    }
    (folder / CFG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return folder


def _shape(src: Path, cfg: dict[str, Any]) -> SaeConfig:
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise StoreError(f"{src} is a sparsify {activation} SAE, which mlsae cannot express (only TopK SAEs import)")
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise StoreError(f"{src} {what}, which mlsae cannot express (only plain TopK SAEs import)")
    try:
        d = int(cfg["d_in"])
        n = int(cfg.get("num_latents") or d * int(cfg.get("expansion_factor", 32)))
        return SaeConfig(d, n, int(cfg.get("k", 32)), standardize=False)
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{src / CFG_NAME} lacks or has an invalid d_in, num_latents or k ({e}) (check --from)") from e


def read_sparsify(src: Path) -> tuple[TopKSAE, dict[str, Any]]:
    """Our SAE from sparsify's folder `src`, and what its cfg.json records (the layer, when the folder's name says)."""
    cfg = read_json(src / CFG_NAME, WHAT)
    shape = _shape(src, cfg)
    d, n = shape.d_model, shape.n_latents
    want = {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}
    sae = TopKSAE(shape)
    sae.load_state_dict(read_tensors(src / WEIGHTS_NAME, want))
    found = _HOOKPOINT.match(src.name)
    return sae, ({"layers": [int(found.group(1))], "hook": "resid_post"} if found else {})
