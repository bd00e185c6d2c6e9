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
