"""plots.py: each figure draws the data it is given (checked on the Figure objects) and writes a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlsae_analyze import plots
from mlsae_cache.core.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = (2, 5, 8, 11)


def layer_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """probs [4, 12] with never-active latents 3 and 7 (NaN), their mean layer and layer std."""
    rng = np.random.default_rng(seed)
    totals = rng.exponential(size=(4, 12)) * (rng.random((4, 12)) < 0.6)
    totals[:, [3, 7]] = 0
    totals[1, 0] = 1.0  # latent 0 fires at one layer only: std 0
    totals[[0, 2, 3], 0] = 0
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = totals / totals.sum(0)
    ell = np.arange(4.0)[:, None]
    mean = (ell * probs).sum(0)
    std = np.sqrt(((ell - mean) ** 2 * probs).sum(0))
    mean[np.isnan(probs).any(0)] = np.nan
    std[np.isnan(probs).any(0)] = np.nan
    return probs, mean, std


def tick_labels(axis) -> list[str]:  # noqa: ANN001
    return [t.get_text() for t in axis.get_ticklabels()]


def test_active_sorted_drops_never_active_latents_and_sorts_by_mean_layer() -> None:
    probs, mean, _ = layer_data()
    matrix, order = plots.active_sorted(probs, mean)
    active = [j for j in range(12) if j not in (3, 7) and not np.isnan(mean[j])]
    assert sorted(order.tolist()) == active
    assert np.all(np.diff(mean[order]) >= 0)
    np.testing.assert_array_equal(matrix, probs[:, order])


def test_heatmap_draws_the_sorted_active_matrix_with_labels(tmp_path: Path) -> None:
    probs, mean, _ = layer_data()
    fig = plots.heatmap_figure(probs, mean, LAYERS, "tiny model")
    ax = fig.axes[0]
    image = ax.images[0]
    matrix, _ = plots.active_sorted(probs, mean)
    np.testing.assert_array_equal(np.asarray(image.get_array()), matrix)
    assert image.origin == "lower" and image.get_clim() == (0.0, 1.0)
    assert ax.get_xlabel() == "latent (sorted by mean layer)" and ax.get_ylabel() == "layer"
    fig.canvas.draw()
    assert tick_labels(ax.yaxis) == [str(b) for b in LAYERS]
    assert "tiny model" in ax.get_title() and "2 never active" in ax.get_title()
    colorbar_ax = fig.axes[1]
    assert "latent" in colorbar_ax.get_ylabel()
    path = plots.layer_heatmap(probs, mean, LAYERS, tmp_path / "h.png", "tiny model")
    assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 5000


def test_layer_ticks_are_thinned_but_stay_block_indices() -> None:
    layers = tuple(range(0, 60, 2))  # 30 layers
    probs = np.eye(30)
    fig = plots.heatmap_figure(probs, np.arange(30.0), layers, "t")
    fig.canvas.draw()
    labels = tick_labels(fig.axes[0].yaxis)
    assert 2 <= len(labels) <= plots.MAX_LAYER_TICKS and labels[0] == "0" and labels[1] == "4"


def test_histograms_count_active_latents_in_two_labelled_panels(tmp_path: Path) -> None:
    _probs, mean, std = layer_data()
    fig = plots.histograms_figure(mean, std, LAYERS, "tiny model")
    left, right = fig.axes
    n_active = int(np.isfinite(mean).sum())
    for ax in (left, right):
        assert sum(p.get_height() for p in ax.patches) == n_active
        assert ax.get_xlabel() and ax.get_ylabel() == "latents" and ax.get_title()
    assert "mean layer" in left.get_xlabel() and "std" in right.get_xlabel()
    assert f"{n_active} active latents" in fig.get_suptitle()
    path = plots.layer_histograms(mean, std, LAYERS, tmp_path / "hist.png", "tiny model")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_cosine_plot_draws_one_point_per_pair(tmp_path: Path) -> None:
    pairs, values = [[0, 1], [1, 2], [2, 3]], [0.9, 0.7, 0.8]
    fig = plots.cosine_figure(pairs, values, "tiny model")
    ax = fig.axes[0]
    x, y = ax.lines[0].get_data()
    assert list(x) == [0, 1, 2] and list(y) == values
    assert "layer" in ax.get_xlabel() and "cosine" in ax.get_ylabel() and ax.get_title() == "tiny model"
    assert plots.cosine_plot(pairs, values, tmp_path / "c.png", "t").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    "call",
    [
        lambda: plots.heatmap_figure(np.full((3, 4), np.nan), np.full(4, np.nan), (0, 1, 2), "t"),
        lambda: plots.heatmap_figure(np.ones((3, 4)), np.ones(5), (0, 1, 2), "t"),
        lambda: plots.histograms_figure(np.full(4, np.nan), np.full(4, np.nan), (0, 1, 2), "t"),
        lambda: plots.cosine_figure([[0, 1]], [0.5, 0.6], "t"),
    ],
    ids=["no-active-latent", "shape-mismatch", "no-active-latent-hist", "cosine-length"],
)
def test_bad_input_is_refused(call) -> None:  # noqa: ANN001
    with pytest.raises(InputError):
        call()


def _escaping_texts(fig) -> list[str]:  # noqa: ANN001
    """What `fig` draws outside its own area (clipped in the PNG): the drawn extent of everything (matplotlib's
    tight bounding box counts only tick labels that are drawn) against the figure, and the texts that escape."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    drawn, box = fig.get_tightbbox(renderer), fig.bbox  # inches, pixels
    width, height = fig.get_figwidth(), fig.get_figheight()
    if drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= width + 0.01 and drawn.y1 <= height + 0.01:
        return []
    out = [f"drawn extent {drawn.bounds} of a {fig.get_figwidth()} x {fig.get_figheight()} in figure"]
    for text in fig.findobj(Text):
        extent = text.get_window_extent(renderer) if text.get_visible() and text.get_text().strip() else None
        outside = extent is not None and not (box.x0 <= extent.x0 and extent.x1 <= box.x1)
        if outside or (extent is not None and not (box.y0 <= extent.y0 and extent.y1 <= box.y1)):
            out.append(text.get_text())
    return out


def every_figure(title: str) -> dict[str, object]:
    from mlsae_analyze.comparison import comparison_figure
    from mlsae_analyze.report_parts import training_figure
    from mlsae_train.results import CompareResult

    probs, mean, std = layer_data()
    few, many = LAYERS[:2], tuple(range(30))
    metrics = [{"rows": 4096 * i, "fvu": 0.5 / i, "l0": 32.0, "dead_fraction": 0.01 * i, "auxk": 0.1} for i in (1, 2)]
    row = {"fvu": 0.3, "delta_ce": 0.2, "kl": 0.1, "kl_spliced_clean": 0.1, "dead_fraction": 0.05}
    compare = CompareResult(rows=[{"layer": 0, "mlsae": row, "single": row}], clean_ce=2.0, n_windows=2)
    wide = np.tile(probs[:, :1], (1, 3))
    tall = np.full((30, 3), 1 / 30)
    return {
        "heatmap, 2 layers": plots.heatmap_figure(wide[:2] / wide[:2].sum(0), np.zeros(3), few, title),
        "heatmap, 30 layers": plots.heatmap_figure(tall, np.full(3, 14.5), many, title),
        "histograms": plots.histograms_figure(mean, std, LAYERS, title),
        "cosine": plots.cosine_figure([[0, 1], [1, 2]], [0.5, 0.9], title),
        "multi-layer": plots.multi_layer_figure({"by_share": {"0.1": 0.5}, "by_rows": {"10": 0.7}}, title),
        "training": training_figure(metrics, title),
        "comparison": comparison_figure(compare),
    }


@pytest.mark.parametrize("title", ["short", "a prompt heatmap of " + "a long prompt with many words " * 8])
def test_no_text_is_clipped_in_any_figure(title: str) -> None:
    clipped = {name: texts for name, fig in every_figure(title).items() if (texts := _escaping_texts(fig))}
    assert not clipped, clipped
