"""Sections of the report that describe where the numbers come from: the SAE's settings and training curve, the
cache it was trained on, a few examples, the points of a training-length study; and the report as an HTML page.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mlsae_analyze import plots
from mlsae_analyze.findings import StudyPoint
from mlsae_analyze.latents import read_latents_meta
from mlsae_analyze.results import VarianceOutput
from mlsae_cache.core.errors import MlsaeError, StoreError
from mlsae_cache.info import cache_info
from mlsae_train.results import EvalResult

SETTINGS = (
    ("n_latents", "latents"),
    ("k", "k (active latents per row)"),
    ("expansion_factor", "expansion factor"),
    ("layers", "layers trained on"),
    ("standardize", "rows standardised"),
    ("lr", "learning rate"),
    ("batch_rows", "rows per step"),
    ("rows_trained", "rows trained"),
    ("train_tokens", "tokens trained on (the rest held out)"),
    ("dead_after_rows", "rows without firing before a latent counts as dead"),
    ("k_aux", "AuxK latents"),
    ("autocast", "encoder autocast"),
    ("seed", "seed"),
    ("finished", "finished"),
)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def read_metrics(sae_dir: Path) -> list[dict[str, Any]]:
    """The lines of the SAE's metrics.jsonl (empty when there is none)."""
    path = sae_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def training_figure(metrics: list[dict[str, Any]], title: str) -> Figure:
    """Three panels against rows trained: the training FVU, L0, and the dead fraction with the AuxK loss."""
    rows = np.array([m["rows"] for m in metrics], dtype=np.float64)
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    series = (("fvu", "training FVU (per batch)"), ("l0", "L0 (active latents per row)"))
    for ax, (key, label) in zip(axes, series, strict=False):
        ax.plot(rows, [m.get(key, np.nan) for m in metrics], color="#3b6ea8")
        ax.set_xlabel("rows trained")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(rows, [m.get("dead_fraction", np.nan) for m in metrics], color="#d1495b", label="dead fraction")
    ax.plot(rows, [m.get("auxk", np.nan) for m in metrics], color="#2a9d8f", label="AuxK loss")
    ax.set_xlabel("rows trained")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.suptitle(plots.wrapped(title, fig, 11), fontsize=11)
    return fig


def sae_section(sae_dir: Path, figures: Path, out: Path) -> list[str]:
    """The SAE's settings and its training curve (drawn into `figures`), as Markdown lines."""
    try:
        cfg = json.loads((sae_dir / "cfg.json").read_text())
    except (OSError, ValueError):
        return []
    lines = ["## The SAE", "", f"`{sae_dir}`", "", "| setting | value |", "|---|---:|"]
    lines += [f"| {label} | {_number(cfg[key])} |" for key, label in SETTINGS if key in cfg]
    metrics = read_metrics(sae_dir)
    if metrics:
        png = plots.save_png(training_figure(metrics, f"training of {sae_dir.name}"), figures / "training.png")
        lines += ["", f"![training curve]({png.relative_to(out).as_posix()})"]
        lines += [
            "",
            "The training FVU is measured per batch in the standardised space the loss uses; the eval table gives the "
            "FVU on held-out tokens in raw units.",
        ]
    return [*lines, ""]


def cache_section(cache_path: str | Path | None) -> list[str]:
    """What the cache holds (model, text, tokens, layers), or nothing when it cannot be read from here."""
    if not cache_path:
        return []
    try:
        facts = cache_info(cache_path)
    except (MlsaeError, OSError):
        return []
    shown = ("model", "architecture", "dataset", "tokens", "trainable_tokens", "context_length", "storage_dtype")
    lines = ["## The cache", "", f"`{cache_path}`", "", "| fact | value |", "|---|---:|"]
    lines += [f"| {key.replace('_', ' ')} | {_number(facts[key])} |" for key in shown if key in facts]
    layers = facts.get("layers", [])
    if layers:
        lines.append(f"| layers | {len(layers)} ({layers[0]}..{layers[-1]}), d_model {facts.get('d_model')} |")
    return [*lines, ""]


def examples_excerpt(examples_dir: Path, n_latents: int = 4) -> list[str]:
    """The best example of each of the first latents of an `examples` OUT, at its strongest layer."""
    try:
        with open(examples_dir / "examples.tsv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except OSError:
        return []
    best: dict[str, dict[str, str]] = {}
    for row in rows:
        latent = row["latent"]
        if latent not in best and len(best) >= n_latents:
            continue
        if latent not in best or float(row["activation"]) > float(best[latent]["activation"]):
            best[latent] = row
    if not best:
        return []
    lines = ["| latent | layer | activation | context |", "|---:|---:|---:|:---|"]
    for row in best.values():
        context = f"{row['left']}**{row['token'].strip() or '␣'}**{row['right']}".replace("|", "\\|")
        lines.append(f"| {row['latent']} | {row['layer']} | {float(row['activation']):.4g} | {context} |")
    return ["", "The strongest example of the first latents:", "", *lines, ""]


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:64em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0}td,th{border-bottom:1px solid #ddd;padding:2px 8px}
img{max-width:100%}code{background:#f4f4f4;padding:0 3px}h2{border-top:1px solid #ccc;padding-top:.5em}"""


def to_html(markdown_text: str, title: str) -> str:
    """The report as one HTML page (tables and images as in report.md, links relative)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def read_study_point(path: Path) -> StudyPoint:
    """One length of a training-length study: a directory holding `variance/` (a `variance` OUT) and `eval.json`
    (an `eval --out` of the same SAE on held-out tokens); the rows trained come from the SAE's cfg.json."""
    variance = VarianceOutput.read(path / "variance")
    evaluation = EvalResult.read(path / "eval.json") if (path / "eval.json").is_file() else None
    sae = Path(evaluation.sae) if evaluation is not None and evaluation.sae else None
    if sae is None:
        sae = Path(read_latents_meta(str(variance.summary.latents)).sae_path)
    try:
        rows = int(json.loads((sae / "cfg.json").read_text())["rows_trained"])
    except (OSError, ValueError, KeyError) as e:
        raise StoreError(f"--study {path}: cannot read the rows trained from {sae}/cfg.json ({e})") from e
    fvu = evaluation.fvu_mean if evaluation is not None else None
    dead = evaluation.dead_fraction if evaluation is not None else None
    return StudyPoint(rows, variance.summary, fvu, dead)
