"""Per-window layer statistics: the reference code's computation (`reference` mode of `variance`) and the same
computation with every mixture normalised (`window` mode).

The reference code (github.com/tim-lawson/mlsae, `mlsae/analysis/variances.py`) updates its metric once per
dataloader batch, one context window at its default batch size; the reference mode reproduces it exactly, with one
update per context window (a run of equal consecutive `sequence` values) over its kept tokens T. With
q[l, t, j] = a / sum_l a (0 where the sum is 0) and V(p) = sum_l l^2 p(l) - (sum_l l p(l))^2 for a possibly
unnormalised p, means running over all T * n_latents pairs (t, j), firing or not:
exp_var_tf = mean_{t,j} V(q[:, t, j]); exp_var_f = mean_j V(mean_t q[:, t, j]); var_l = V(mean_{t,j} q);
rel_var_f = exp_var_f / var_l; rel_var_t = exp_var_tf / exp_var_f; each then averaged over windows.
V of an unnormalised mixture of mass m is m Var + m (1 - m) E^2, not a variance: it depends on where the layer
index starts, so no conclusion may rest on these numbers; they exist to be set beside the reference's output.
One deviation from the reference: a ratio that is not finite in a window (var_l = 0) is left out of that ratio's
mean, where the reference returns NaN.

The window mode takes the same per-window steps with every mixture a distribution: a (token, latent) pair or a
latent that does not fire in the window has no mixture and is left out. Over the P pairs (t, j) that fire:
exp_var_tf = mean Var(L | t, j); exp_var_f = mean over the latents j that fire of the variance of
p_j = mean over the T_j tokens where j fires of q[:, t, j]; var_l = the variance of the mean of the P mixtures.
Every number is then a variance of a distribution over layers, unchanged when the layers are relabelled
l -> l + c (`offset` moves the labels, to show it).

A window cut by a chunk boundary stays open (`Window`) until the neighbouring chunk is merged, so results do not
depend on chunking beyond floating-point summation order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

REFERENCE_KEYS = ("exp_var_tf", "exp_var_f", "var_l", "rel_var_f", "rel_var_t")
MODES = ("reference", "window")
_N_METRICS = len(REFERENCE_KEYS)


@dataclasses.dataclass(frozen=True)
class Window:
    """The sums of one context window over the tokens seen so far.

    sums: shape [5] = (T, sum V(q[:, t, j]), sum m1[t, j], sum m2[t, j], P) over the P firing pairs, with
    m1 = sum_l l q[l, t, j] and m2 = sum_l l^2 q[l, t, j]; rows: shape [3, n_latents], per latent: sum_t m1,
    sum_t m2 and the number of tokens T_j where it fires.
    """

    seq: int
    sums: np.ndarray
    rows: np.ndarray


@dataclasses.dataclass(frozen=True)
class RefPartial:
    """Per-window state of a contiguous token range.

    edges: the first and last windows of the range (one if it holds one window, none if empty), which may
    continue outside it; done: shape [2, 1 + 2 * 5], per mode (reference, window) the number of closed windows,
    the sum of each metric over them, and the number of finite values of each metric.
    """

    edges: tuple[Window, ...]
    done: np.ndarray


def empty_done() -> np.ndarray:
    return np.zeros((len(MODES), 1 + 2 * _N_METRICS))


def _ratios(exp_var_tf: float, exp_var_f: float, var_l: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.divide([exp_var_f, exp_var_tf], [var_l, exp_var_f])
    return np.array([exp_var_tf, exp_var_f, var_l, *ratios])


def reference_metrics(window: Window, n_latents: int) -> np.ndarray:
    """The reference's five numbers for one complete window, shape [5].

    With N = T * n: exp_var_tf = sum V / N; exp_var_f = sum m2 / N - sum_j A_j^2 / (T^2 n);
    var_l = sum m2 / N - (sum m1 / N)^2; rel_var_f = exp_var_f / var_l; rel_var_t = exp_var_tf / exp_var_f.
    """
    n_tok, sum_var, sum_m1, sum_m2, _ = window.sums
    a_row = window.rows[0]
    size = n_tok * n_latents
    exp_var_f = sum_m2 / size - float(a_row @ a_row) / (n_tok * size)
    return _ratios(sum_var / size, exp_var_f, sum_m2 / size - (sum_m1 / size) ** 2)


def window_metrics(window: Window) -> np.ndarray | None:
    """The window mode's five numbers for one complete window, shape [5] (None: no pair fires in it)."""
    _, sum_var, sum_m1, sum_m2, n_pairs = window.sums
    if n_pairs == 0:
        return None
    m1_row, m2_row, count = window.rows
    fired = count > 0
    mean, second = m1_row[fired] / count[fired], m2_row[fired] / count[fired]
    exp_var_f = float((second - mean**2).mean())
    return _ratios(sum_var / n_pairs, exp_var_f, sum_m2 / n_pairs - (sum_m1 / n_pairs) ** 2)


def close_windows(done: np.ndarray, windows: list[Window], n_latents: int) -> np.ndarray:
    """Add complete windows to `done`; a non-finite ratio (0/0) is left out of that metric's mean."""
    done = done.copy()
    for window in windows:
        for mode, metrics in enumerate((reference_metrics(window, n_latents), window_metrics(window))):
            if metrics is None:
                continue
            finite = np.isfinite(metrics)
            done[mode, 0] += 1
            done[mode, 1 : 1 + _N_METRICS] += np.where(finite, metrics, 0.0)
            done[mode, 1 + _N_METRICS :] += finite
    return done


def ref_merge(windows: list[Window], done: np.ndarray, n_latents: int) -> RefPartial:
    """Per-window state of consecutive windows in token order: joins equal neighbours, closes interior ones."""
    joined: list[Window] = []
    for window in windows:
        if joined and joined[-1].seq == window.seq:
            last = joined.pop()
            window = Window(window.seq, last.sums + window.sums, last.rows + window.rows)
        joined.append(window)
    edges = tuple(joined[:1] + joined[1:][-1:])
    return RefPartial(edges, close_windows(done, joined[1:-1], n_latents))


def pair_moments(
    indices: np.ndarray, values: np.ndarray, n_latents: int, offset: float = 0.0
) -> tuple[np.ndarray, ...]:
    """Layer moments of every (token, latent) pair that fires in B consecutive tokens, layers labelled l + offset.

    indices, values: [B, L, k] (inactive slots already pointing at latent 0 with value 0). A dense [B * n]
    scratch finds the P pairs with S > 0, then the moments are summed compactly. Returns, each of shape [P]:
    token, latent, S = sum_l a, M1 = sum_l a l, M2 = sum_l a l^2.
    """
    n_tok, n_layers, _ = indices.shape
    key = (np.arange(n_tok)[:, None, None] * n_latents + indices).ravel()
    act = values.ravel().astype(np.float64)
    scratch = np.bincount(key, weights=act, minlength=n_tok * n_latents)
    pairs = np.flatnonzero(scratch > 0)
    slot = np.zeros(scratch.size, dtype=np.int32)
    slot[pairs] = np.arange(len(pairs), dtype=np.int32)
    pair_of_entry = slot[key]  # a slot of an unfired pair lands on pair 0 with weight 0
    labels = np.arange(n_layers, dtype=np.float64) + offset
    layer = np.broadcast_to(labels[:, None], indices.shape).ravel()
    act_layer = act * layer
    m1_sum = np.bincount(pair_of_entry, weights=act_layer, minlength=len(pairs))
    m2_sum = np.bincount(pair_of_entry, weights=act_layer * layer, minlength=len(pairs))
    token, latent = np.divmod(pairs, n_latents)
    return token, latent, scratch[pairs], m1_sum, m2_sum


def token_batch(
    indices: np.ndarray, values: np.ndarray, sequence: np.ndarray, n_latents: int, offset: float = 0.0
) -> tuple[float, list[Window]]:
    """Sums of B consecutive tokens: indices, values [B, L, k] as for `pair_moments`; sequence [B].

    With m1 = M1 / S = E[L|t,j] and m2 = M2 / S per firing pair, returns sum_{t,j} (M2 - M1 m1) and one
    `Window` per run of equal `sequence` (non-firing pairs have q = 0 and add nothing but to T).
    """
    token, latent, s, m1_sum, m2_sum = pair_moments(indices, values, n_latents, offset)
    m1, m2 = m1_sum / s, m2_sum / s
    within = float((m2_sum - m1_sum * m1).sum())
    is_start = np.r_[True, sequence[1:] != sequence[:-1]]
    run = (np.cumsum(is_start) - 1)[token]
    n_runs = int(is_start.sum())
    ones = np.ones_like(m1)
    per_pair = np.stack([ones, m2 - m1 * m1, m1, m2, ones])
    if n_runs == 1:  # the common case: no window starts inside the batch
        sums = per_pair.sum(1, keepdims=True).T
        sums[0, 0] = len(sequence)
        key, size = latent, n_latents
    else:
        sums = np.stack([np.bincount(run, weights=w, minlength=n_runs) for w in per_pair], axis=1)
        sums[:, 0] = np.bincount(np.cumsum(is_start) - 1, minlength=n_runs)
        key, size = run * n_latents + latent, n_runs * n_latents
    rows = np.stack([np.bincount(key, weights=w, minlength=size) for w in (m1, m2, ones)])
    rows = rows.reshape(3, n_runs, n_latents)
    seqs = sequence[is_start]
    return within, [Window(int(seqs[r]), sums[r], rows[:, r]) for r in range(n_runs)]


def ratio(num: float, den: float) -> float:
    return float(num / den) if den != 0 else float("nan")


def window_summaries(ref: RefPartial, n_latents: int) -> dict[str, dict[str, Any]]:
    """Close the remaining windows; per mode, each metric is its unweighted mean over windows (finite values
    only), with the number of windows."""
    done = close_windows(ref.done, list(ref.edges), n_latents)
    summaries = {}
    for mode, row in zip(MODES, done, strict=True):
        sums, finite = row[1 : 1 + _N_METRICS], row[1 + _N_METRICS :]
        means = {key: ratio(s, c) for key, s, c in zip(REFERENCE_KEYS, sums, finite, strict=True)}
        summaries[mode] = {**means, "n_windows": int(row[0])}
    return summaries
