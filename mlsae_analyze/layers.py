"""Where a latent sits over layers: the per-layer sums of sparse latents and the distribution P_j(l) they give.

With a[l, t, j] >= 0 latent j's activation at layer position l and token t (0 when it is not in the top-k):

    totals[l, j] = sum_t a[l, t, j];  counts[l, j] = #{t : a[l, t, j] > 0};
    P_j(l) = totals[l, j] / sum_l totals[l, j];  E[L|j] = sum_l l P_j(l);  Var[L|j] = sum_l (l - E[L|j])^2 P_j(l).

Layers are positions l = 0..L-1 among the layers of the store, whatever block indices they hold. A latent that
never fires has no distribution (NaN). The variance analysis, the examples, the prompt heatmap and the explorer
all compute these here.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class LayerDistribution(NamedTuple):
    """P_j(l) [L, n]; E[L|j], Var[L|j] and sqrt(Var[L|j]) [n] (NaN for latents that never fire)."""

    probs: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    std: np.ndarray


def layer_totals(indices: np.ndarray, values: np.ndarray, n_latents: int) -> tuple[np.ndarray, np.ndarray]:
    """totals [L, n] float64 and counts [L, n] int64 of sparse latents indices, values [T, L, k].

    An inactive slot (value 0) adds nothing whatever index it carries, so it must hold a valid index (0 will do).
    One layer at a time: bincount over a [T * k] slice is about 3x faster than over a [T * L * k] flat key.
    """
    n_layers = indices.shape[1]
    totals = np.zeros((n_layers, n_latents))
    counts = np.zeros((n_layers, n_latents), dtype=np.int64)
    for layer in range(n_layers):
        index, value = indices[:, layer].ravel(), values[:, layer].ravel()
        totals[layer] = np.bincount(index, weights=value, minlength=n_latents)
        counts[layer] = np.bincount(index, weights=value > 0, minlength=n_latents)
    return totals, counts


def layer_distribution(totals: np.ndarray) -> LayerDistribution:
    """The distribution over layers of each latent from totals [L, n] (see the module docstring)."""
    per_latent = totals.sum(0)
    probs = np.divide(totals, per_latent, out=np.full_like(totals, np.nan, dtype=np.float64), where=per_latent > 0)
    layer = np.arange(totals.shape[0], dtype=np.float64)[:, None]
    mean = (layer * probs).sum(0)
    var = ((layer - mean) ** 2 * probs).sum(0)
    return LayerDistribution(probs, mean, var, np.sqrt(var))


def block_mean(mean: float, layers: tuple[int, ...]) -> float:
    """A mean layer position as a block index, interpolated between the blocks of neighbouring positions."""
    return float(np.interp(mean, np.arange(len(layers)), layers))


def layer_runs(blocks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
