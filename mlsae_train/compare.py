"""An MLSAE beside single-layer SAEs, layer by layer: FVU, delta CE, KL and dead fraction.

The single-layer SAEs are ordinary checkpoints trained with `mlsae-train fit --layers l` (one per layer, same
expansion factor and k as the MLSAE for a fair comparison; a mismatch is logged, not refused). Every metric
is computed on the same evaluation rows and windows for all SAEs: FVU and the dead fraction by `evaluate` on
the trainable rows of the cache's token range [start, stop), delta CE and KL (with `splice`) by
`splice_metrics` in one pass whose clean forward is shared by every SAE. The MLSAE's dead fraction is over
all its layers (one dictionary serves them all), so it is the same in every row; a single-layer SAE's is over
its own layer.

Outputs in OUT: compare.json (the rows), compare.md (the table) and compare.png (one panel per metric).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlsae_cache.errors import InputError
from mlsae_cache.models import resolve_device
from mlsae_cache.store import Cache
from mlsae_train.checkpoint import load_sae
from mlsae_train.evaluate import evaluate
from mlsae_train.sae import TopKSAE
from mlsae_train.splice import SpliceConfig, SpliceTarget, splice_targets

log = logging.getLogger(__name__)

METRICS = ("fvu", "delta_ce", "kl", "dead_fraction")
LABELS = {"fvu": "FVU", "delta_ce": "delta CE (nats/token)", "kl": "KL (nats/token)", "dead_fraction": "dead fraction"}
KINDS = ("mlsae", "single")


def parse_single(text: str) -> tuple[int, Path]:
    """`L=DIR` -> (L, DIR): the checkpoint of an SAE trained on block L alone."""
    layer, sep, path = text.partition("=")
    try:
        if not sep or not path:
            raise ValueError(text)
        return int(layer), Path(path)
    except ValueError as e:
        raise InputError(f"--single {text!r} is not LAYER=DIR (e.g. --single 3=runs/sae-l3)") from e


@dataclass(frozen=True)
class CompareConfig:
    """Everything `mlsae-train compare` takes; CLI options map one-to-one onto these fields."""

    mlsae: Path
    out: Path
    cache: Path
    singles: tuple[tuple[int, Path], ...] = ()
    splice: bool = False
    model: str | None = None
    dataset: str | None = None
    start: int = 0
    stop: int | None = None
    max_windows: int | None = None
    batch_windows: int = 8
    device: str = "auto"

    def __post_init__(self) -> None:
        layers = [layer for layer, _ in self.singles]
        if len(set(layers)) != len(layers):
            raise InputError(f"--single names layers {layers}; give each layer at most once")
        self.splice_config().check_used(self.splice)  # also validates the range and window options

    def splice_config(self) -> SpliceConfig:
        return SpliceConfig(self.model, self.dataset, self.start, self.stop, self.max_windows, self.batch_windows)


@dataclass(frozen=True)
class CompareResult:
    """One row per MLSAE layer: {"layer", "mlsae": {metric: value}, "single": {metric: value} | None}."""

    rows: list[dict[str, Any]]
    clean_ce: float | None
    n_windows: int | None
    sources: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "clean_ce": self.clean_ce, "n_windows": self.n_windows, "sources": self.sources}


def load_singles(
    cfg: CompareConfig, mlsae: TopKSAE, layers: tuple[int, ...], device: torch.device
) -> dict[int, TopKSAE]:
    """Layer -> single-layer SAE; each must have been trained on that layer, and the layer be the MLSAE's."""
    singles: dict[int, TopKSAE] = {}
    for layer, path in cfg.singles:
        if layer not in layers:
            raise InputError(f"--single {layer}={path}: layer {layer} is not one of the MLSAE's layers {list(layers)}")
        sae, sae_cfg = load_sae(path, device)
        trained = sae_cfg.get("layers")
        if trained is not None and list(trained) != [layer]:
            raise InputError(f"--single {layer}={path} was trained on layers {trained}, not [{layer}] (fit --layers)")
        if (sae.cfg.n_latents, sae.cfg.k) != (mlsae.cfg.n_latents, mlsae.cfg.k):
            log.warning(
                "%s has n_latents %d and k %d but the MLSAE has %d and %d: the comparison is not like for like",
                path,
                sae.cfg.n_latents,
                sae.cfg.k,
                mlsae.cfg.n_latents,
                mlsae.cfg.k,
            )
        singles[layer] = sae
    return singles


def _fvu_dead(sae: TopKSAE, cache: Cache, layers: tuple[int, ...], cfg: CompareConfig) -> dict[int, dict]:
    result = evaluate(sae, cache, layers, cfg.start, cfg.stop)
    return {
        layer: {"fvu": fvu, "dead_fraction": result.dead_fraction}
        for layer, fvu in zip(layers, result.fvu, strict=True)
    }


def compare(cfg: CompareConfig, progress: Callable[[int], None] = lambda n: None) -> CompareResult:
    """Compute the comparison and write compare.json, compare.md and compare.png into cfg.out."""
    device = resolve_device(cfg.device)
    mlsae, mlsae_cfg = load_sae(cfg.mlsae, device)
    cache = Cache(cfg.cache)
    layers = tuple(mlsae_cfg.get("layers") or cache.layers)
    singles = load_singles(cfg, mlsae, layers, device)
    metrics = {"mlsae": _fvu_dead(mlsae, cache, layers, cfg), "single": {}}
    for layer, sae in singles.items():
        metrics["single"].update(_fvu_dead(sae, cache, (layer,), cfg))
    clean_ce = n_windows = None
    if cfg.splice:
        keys = [("mlsae", layer) for layer in layers] + [("single", layer) for layer in singles]
        targets = [SpliceTarget(layer, mlsae if kind == "mlsae" else singles[layer]) for kind, layer in keys]
        spliced = splice_targets(cache, targets, cfg.splice_config(), device, progress=progress)
        for (kind, layer), dce, kl in zip(keys, spliced.delta_ce, spliced.kl, strict=True):
            metrics[kind][layer].update({"delta_ce": dce, "kl": kl})
        clean_ce, n_windows = spliced.clean_ce, spliced.n_windows
    rows = [
        {"layer": layer, "mlsae": metrics["mlsae"][layer], "single": metrics["single"].get(layer)} for layer in layers
    ]
    sources = {"mlsae": str(cfg.mlsae), "single": {str(k): str(v) for k, v in cfg.singles}, "cache": str(cfg.cache)}
    result = CompareResult(rows, clean_ce, n_windows, sources)
    return replace(result, files=write_outputs(result, cfg.out))


# ---------------------------------------------------------------------------------------------- outputs


def _columns(result: CompareResult) -> list[str]:
    return [m for m in METRICS if any(m in row["mlsae"] for row in result.rows)]


def table_rows(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """Header and cells: per layer, each metric for the MLSAE then the single-layer SAE ('-' when absent)."""
    short = {"fvu": "FVU", "delta_ce": "dCE", "kl": "KL", "dead_fraction": "dead"}
    columns = _columns(result)
    header = ["layer"] + [f"{short[m]} {kind}" for m in columns for kind in KINDS]
    cells = []
    for row in result.rows:
        values = [row[kind].get(m) if row[kind] else None for m in columns for kind in KINDS]
        cells.append([str(row["layer"])] + ["-" if v is None else f"{v:.4g}" for v in values])
    return header, cells


def format_table(result: CompareResult) -> str:
    """The comparison as aligned plain text (what the CLI prints)."""
    header, cells = table_rows(result)
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *cells]]
    if result.clean_ce is not None:
        lines.append(f"clean CE {result.clean_ce:.4f} nats/token over {result.n_windows} windows")
    return "\n".join(lines)


def format_markdown(result: CompareResult) -> str:
    header, cells = table_rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    notes = [
        "",
        f"MLSAE {result.sources.get('mlsae')} against single-layer SAEs on cache {result.sources.get('cache')}.",
        "dCE and KL are per token in nats (spliced minus clean; KL(p_clean || p_spliced)). The MLSAE's dead "
        "fraction is over all its layers, a single-layer SAE's over its own layer.",
    ]
    if result.clean_ce is not None:
        notes.append(f"Clean CE {result.clean_ce:.4f} nats/token over {result.n_windows} windows.")
    return "\n".join(lines + notes) + "\n"


def comparison_figure(result: CompareResult) -> Figure:
    """One panel per metric against the layer: the MLSAE and the single-layer SAEs as two lines (broken where a
    layer has no single-layer SAE)."""
    columns = _columns(result)
    n_rows = (len(columns) + 1) // 2
    fig = Figure(figsize=(9.0, 3.4 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, 2, squeeze=False).ravel()
    layers = [row["layer"] for row in result.rows]
    for ax, metric in zip(axes, columns, strict=False):
        for kind, style in (("mlsae", {"marker": "o"}), ("single", {"marker": "s", "linestyle": "--"})):
            ys = [row[kind][metric] if row[kind] and metric in row[kind] else np.nan for row in result.rows]
            if not np.isnan(ys).all():
                ax.plot(layers, ys, label="MLSAE" if kind == "mlsae" else "single-layer SAEs", **style)
        ax.set_xlabel("layer (block index)")
        ax.set_ylabel(LABELS[metric])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    fig.suptitle("MLSAE vs single-layer SAEs")
    return fig


def write_outputs(result: CompareResult, out: Path) -> list[str]:
    """compare.json, compare.md and compare.png in `out` (created if needed); returns their paths."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT {out} is a file (choose a directory)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / "compare.md").write_text(format_markdown(result))
    fig = comparison_figure(result)
    FigureCanvasAgg(fig)
    fig.savefig(out / "compare.png", format="png", dpi=150)
    return [str(out / name) for name in ("compare.json", "compare.md", "compare.png")]
