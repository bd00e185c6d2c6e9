"""Figures of the layer analyses (docs/METHOD.md section 6), drawn with matplotlib's object API.

Each `*_figure` function builds a `matplotlib.figure.Figure` without touching pyplot's global state (safe
in threads; tests inspect the returned object); each writer saves one as a PNG through the Agg canvas and
returns its path. Layer axes run over layer **positions** l = 0..L-1, as in `variance.py`, and are labelled
with the block indices `layers[l]`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter

from mlsae_cache.core.errors import InputError

CMAP = "viridis"
DPI = 150
MAX_LAYER_TICKS = 16


def save_png(fig: Figure, path: Path | str) -> Path:
    """Render `fig` with the Agg canvas into the PNG `path`; returns the path."""
    path = Path(path)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def wrapped(title: str, fig: Figure, fontsize: float, share: float = 1.0) -> str:
    """`title` broken into lines that fit `share` of the figure's width at `fontsize` (matplotlib never wraps a
    title itself: a long prompt would run off both edges of the PNG)."""
    chars = max(20, int(share * fig.get_figwidth() * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in title.splitlines() or [""])


def active_sorted(probs: np.ndarray, layer_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The heatmap matrix: columns of active latents sorted by mean layer (ties keep latent order).

    probs: [L, n] P_j(l), NaN columns for never-active latents; layer_mean: [n] E[L|j], NaN likewise.
    Returns (matrix [L, n_active], latent ids [n_active] in column order).
    """
    probs, layer_mean = np.asarray(probs, dtype=np.float64), np.asarray(layer_mean, dtype=np.float64)
    if probs.ndim != 2 or layer_mean.shape != (probs.shape[1],):
        raise InputError(f"probs must be [L, n] and layer_mean [n]; got {probs.shape} and {layer_mean.shape}")
    active = np.flatnonzero(np.isfinite(layer_mean) & np.isfinite(probs).all(axis=0))
    order = active[np.argsort(layer_mean[active], kind="stable")]
    return probs[:, order], order


def _layer_axis(axis: Axis, layers: Sequence[int]) -> None:
    """Ticks at layer positions, labelled with block indices; at most MAX_LAYER_TICKS of them."""
    step = max(1, int(np.ceil(len(layers) / MAX_LAYER_TICKS)))
    axis.set_major_locator(FixedLocator(list(range(0, len(layers), step))))
    labels = [str(b) for b in layers]
    # int(): round() of a numpy scalar is a float before numpy 2
    axis.set_major_formatter(FuncFormatter(lambda x, _: labels[int(round(x))] if 0 <= round(x) < len(labels) else ""))  # noqa: RUF046


def heatmap_figure(probs: np.ndarray, layer_mean: np.ndarray, layers: Sequence[int], title: str) -> Figure:
    """Paper Figure 1: P_j(l) for every active latent j (columns, sorted by E[L|j]) and layer l (rows).

    probs: [L, n]; layer_mean: [n]; layers: the L block indices. Never-active latents are dropped.
    """
    matrix, _ = active_sorted(probs, layer_mean)
    if matrix.shape[1] == 0:
        raise InputError("no active latent to plot (every latent's layer distribution is NaN)")
    n_layers, n_dropped = len(layers), probs.shape[1] - matrix.shape[1]
    fig = Figure(figsize=(10, max(3.8, 1.8 + 0.16 * n_layers)), layout="constrained")
    ax = fig.add_subplot()
    # A square-root colour scale: diffuse latents (P ~ 0.05 at many layers) stay visible beside sharp ones.
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    image = ax.imshow(matrix, aspect="auto", origin="lower", cmap=CMAP, norm=norm, interpolation="antialiased")
    note = f"{matrix.shape[1]:,} active latents"
    note += f"; {n_dropped:,} never active, not shown" if n_dropped else ""
    ax.set_title(wrapped(f"{title}\n{note}", fig, 11, 0.85), fontsize=11)
    ax.set_xlabel("latent (sorted by mean layer)")
    ax.set_ylabel("layer")
    _layer_axis(ax.yaxis, layers)
    bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.04)
    bar.set_label("P(layer | latent)\nshare of activation, sqrt scale")
    bar.set_ticks([0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 1.0])
    return fig


def layer_heatmap(
    probs: np.ndarray, layer_mean: np.ndarray, layers: Sequence[int], out_png: Path | str, title: str
) -> Path:
    """Write `heatmap_figure` to `out_png`; returns the path."""
    return save_png(heatmap_figure(probs, layer_mean, layers, title), out_png)


def _histogram(ax: Axes, values: np.ndarray, bins: np.ndarray, xlabel: str, title: str) -> None:
    # matplotlib's stubs type `bins` as a Sequence; it takes any array-like, as documented
    counts, _, _ = ax.hist(values, bins=bins, color="#3b6ea8", edgecolor="white", linewidth=0.3)  # type: ignore[arg-type]
    assert isinstance(counts, np.ndarray)  # one data set: one array of counts
    ax.set_ylim(0, 1.25 * max(float(counts.max()), 1.0))  # headroom: the legend never covers a bar
    mean = float(values.mean())
    ax.axvline(mean, color="#d1495b", linewidth=1.5, label=f"mean {mean:.2f}")
    ax.legend(frameon=False, loc="upper right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latents")
    ax.set_title(title, fontsize=10)


def histograms_figure(layer_mean: np.ndarray, layer_std: np.ndarray, layers: Sequence[int], title: str) -> Figure:
    """Two panels over active latents: (a) the mean layer E[L|j], (b) the layer std sqrt(Var[L|j]).

    layer_mean, layer_std: [n], NaN for never-active latents (dropped); both in layer positions.
    """
    layer_mean, layer_std = np.asarray(layer_mean, np.float64), np.asarray(layer_std, np.float64)
    active = np.isfinite(layer_mean) & np.isfinite(layer_std)
    if not active.any():
        raise InputError("no active latent to plot (every latent's layer distribution is NaN)")
    means, stds = layer_mean[active], layer_std[active]
    last = len(layers) - 1
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    mean_bins = np.arange(-0.25, last + 0.5, 0.5)  # integer means (one-layer latents) sit mid-bin
    _histogram(left, means, mean_bins, "mean layer E[L | latent]", "(a) where each latent sits")
    _layer_axis(left.xaxis, layers)
    std_bins = np.linspace(0.0, max(float(stds.max()), 0.5), 41)
    single = float((stds == 0).mean())
    _histogram(
        right, stds, std_bins, "layer std  sqrt(Var[L | latent])  (in layers)", "(b) how far each latent spreads"
    )
    right.annotate(
        f"{single:.1%} at one layer only (std 0)", xy=(0.98, 0.80), xycoords="axes fraction", ha="right", fontsize=9
    )
    fig.suptitle(wrapped(f"{title}\n{int(active.sum()):,} active latents", fig, 11), fontsize=11)
    return fig


def layer_histograms(
    layer_mean: np.ndarray, layer_std: np.ndarray, layers: Sequence[int], out_png: Path | str, title: str
) -> Path:
    """Write `histograms_figure` to `out_png`; returns the path."""
    return save_png(histograms_figure(layer_mean, layer_std, layers, title), out_png)


def cosine_figure(layer_pairs: Sequence[Sequence[int]], cosine: Sequence[float], title: str) -> Figure:
    """Adjacent-layer cosine similarity of the mean-centred residual stream, one point per pair (a, b)."""
    if len(layer_pairs) != len(cosine) or not len(cosine):
        raise InputError(f"need one cosine per layer pair; got {len(layer_pairs)} pairs and {len(cosine)} values")
    first = [int(pair[0]) for pair in layer_pairs]
    values = np.asarray(cosine, dtype=np.float64)
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(first, values, marker="o", color="#3b6ea8")
    ax.set_xlabel("layer l (compared with the next stored layer)")
    ax.set_ylabel("cosine similarity, mean-centred")
    ax.set_ylim(min(0.0, float(values.min()) - 0.05), 1.0)
    ax.grid(alpha=0.3)
    step = max(1, int(np.ceil(len(first) / MAX_LAYER_TICKS)))
    ax.set_xticks(first[::step])
    ax.set_title(wrapped(title, fig, 11, 0.9), fontsize=11)
    return fig


def cosine_plot(layer_pairs: Sequence[Sequence[int]], cosine: Sequence[float], out_png: Path | str, title: str) -> Path:
    """Write `cosine_figure` to `out_png`; returns the path."""
    return save_png(cosine_figure(layer_pairs, cosine, title), out_png)


def multi_layer_figure(curve: dict[str, dict[str, float]], title: str) -> Figure:
    """The fraction of latents active at two layers or more, as the threshold for a layer to count rises: by its
    share of the latent's activation mass (left) and by rows (right)."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    panels = fig.subplots(1, 2, sharey=True)
    for ax, (key, label, fmt) in zip(
        panels,
        (("by_share", "a layer counts from this share of the latent's mass", "{:.0%}"),
         ("by_rows", "a layer counts from this many rows", "{:,.0f}")),
        strict=True,
    ):  # fmt: skip
        points = curve.get(key, {})
        xs = [float(x) for x in points]
        ax.plot(xs, list(points.values()), marker="o", color="#3b6ea8")
        ax.set_xscale("log")
        ax.set_xticks(xs, [fmt.format(x) for x in xs])
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("latents active at 2+ layers")
    fig.suptitle(wrapped(title, fig, 11), fontsize=11)
    return fig
