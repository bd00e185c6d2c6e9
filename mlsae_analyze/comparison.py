"""The table and figure of a comparison of an MLSAE with single-layer SAEs (`mlsae-train compare`'s result)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlsae_train.results import COMPARE_KINDS, CompareResult

LABELS = {
    "fvu": "FVU",
    "delta_ce": "delta CE (nats/token)",
    "kl": "KL(clean || spliced), nats/token",
    "kl_spliced_clean": "KL(spliced || clean), nats/token",
    "dead_fraction": "dead fraction",
}
NOTE = (
    "dCE, KL and rKL are per token in nats: dCE spliced minus clean CE, KL = KL(p_clean || p_spliced), rKL = "
    "KL(p_spliced || p_clean) (the direction the reference code computes, there summed over a sequence); the "
    "MLSAE's dead fraction is over all its layers, a single-layer SAE's over its own layer."
)


def markdown_table(result: CompareResult) -> list[str]:
    """The per-layer table as Markdown lines."""
    header, cells = result.table()
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in cells]


def comparison_figure(result: CompareResult) -> Figure:
    """One panel per metric against the layer: the MLSAE and the single-layer SAEs as two lines (broken where a
    layer has no single-layer SAE)."""
    columns = result.columns()
    n_rows = (len(columns) + 1) // 2
    fig = Figure(figsize=(9.0, 3.4 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, 2, squeeze=False).ravel()
    layers = [row["layer"] for row in result.rows]
    for ax, metric in zip(axes, columns, strict=False):
        for kind, style in zip(COMPARE_KINDS, ({"marker": "o"}, {"marker": "s", "linestyle": "--"}), strict=True):
            ys = [row[kind][metric] if row[kind] and metric in row[kind] else np.nan for row in result.rows]
            ys = [np.nan if y is None else y for y in ys]
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
