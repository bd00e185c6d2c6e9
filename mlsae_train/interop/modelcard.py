"""The model card (README.md with YAML front matter) that `push` uploads beside an SAE: library name, the paper,
model, dataset, layers, hyperparameters and, given an eval result, per-layer FVU and delta CE."""

from __future__ import annotations

import json
from typing import Any

from mlsae_train.interop.provenance import UNTRAINED_POSITIONS, Provenance
from mlsae_train.results import EvalResult

LIBRARY = "mlsae"
ARXIV = "2409.04185"
_ARCHITECTURE = ("d_model", "n_latents", "k", "standardize")
_SKIPPED = {"format", "version", "save_id", "layers", "n_layers", "model", "hook", "imported_from", "reference_config"}


def _front_matter(prov: Provenance) -> list[str]:
    lines = ["---", f"library_name: {LIBRARY}", "tags:", "- sparse-autoencoder", "- mlsae", "- topk-sae"]
    if prov.model and "/" in prov.model:
        lines.append(f"base_model: {json.dumps(prov.model)}")
    if prov.dataset and "/" in prov.dataset:
        lines += ["datasets:", f"- {json.dumps(prov.dataset)}"]
    return [*lines, "---", ""]


def _settings_table(cfg: dict[str, Any]) -> list[str]:
    rows = [(k, cfg[k]) for k in _ARCHITECTURE if k in cfg]
    rows += [(k, v) for k, v in cfg.items() if k not in _ARCHITECTURE and k not in _SKIPPED]
    return ["| setting | value |", "|---|---|", *(f"| {k} | `{json.dumps(v)}` |" for k, v in rows), ""]


def _eval_table(result: EvalResult) -> list[str]:
    spliced = result.delta_ce is not None
    head = "| layer | FVU | L0 |" + (" delta CE (nats) |" if spliced else "")
    lines = ["## Evaluation", "", head, "|---:|---:|---:|" + ("---:|" if spliced else "")]
    for i, layer in enumerate(result.layer):
        fvu = result.fvu_value(i)
        row = f"| {layer} | {fvu:.4f} | {result.l0[i]:.1f} |"
        lines.append(row + (f" {result.delta_ce[i]:.4f} |" if result.delta_ce is not None else ""))
    lines += ["", f"Mean FVU {result.fvu_mean:.4f}, dead fraction {result.dead_fraction:.4f} (`eval.json`)."]
    if result.delta_ce_mean is not None:
        lines[-1] += f" Mean delta CE {result.delta_ce_mean:.4f} nats over {result.n_predicted} predictions."
    return [*lines, ""]


def model_card(title: str, cfg: dict[str, Any], prov: Provenance, result: EvalResult | None) -> str:
    """README.md for the hub folder `title` holding the SAE of cfg.json `cfg` (already without local paths)."""
    layers = ", ".join(str(layer) for layer in prov.layers) or "not recorded"
    lines = [
        *_front_matter(prov),
        f"# {title}",
        "",
        f"A multi-layer TopK sparse autoencoder (MLSAE, arXiv [{ARXIV}](https://arxiv.org/abs/{ARXIV})) trained "
        f"with `{LIBRARY}` on the {prov.hook} residual stream of `{prov.model or 'an unrecorded model'}`: one "
        f"dictionary for layers {layers}. Dataset: `{prov.dataset or 'not recorded'}`; context "
        f"{prov.context_size or 'not recorded'} tokens.",
        "",
        f"It was {UNTRAINED_POSITIONS}.",
        "",
        "```python",
        "from mlsae_train import load_sae",
        f'sae, cfg = load_sae("hf://{title}")',
        "```",
        "",
        "## Settings",
        "",
        *_settings_table(cfg),
    ]
    if result is not None:
        lines += _eval_table(result)
    return "\n".join(lines)
