"""Per-window layer statistics: the reference code's computation (`reference` mode of `variance`).

The reference code (github.com/tim-lawson/mlsae, `mlsae/analysis/variances.py`) updates its metric once per
dataloader batch, one context window at its default batch size; this module reproduces it exactly, with one
update per context window (a run of equal consecutive `sequence` values) over its kept tokens T. With
q[l, t, j] = a / sum_l a (0 where the sum is 0) and V(p) = sum_l l^2 p(l) - (sum_l l p(l))^2 for a possibly
unnormalised p, means running over all T * n_latents pairs (t, j), firing or not:
exp_var_tf = mean_{t,j} V(q[:, t, j]); exp_var_f = mean_j V(mean_t q[:, t, j]); var_l = V(mean_{t,j} q);
rel_var_f = exp_var_f / var_l; rel_var_t = exp_var_tf / exp_var_f; each then averaged over windows.

V of an unnormalised mixture of mass m is m Var + m (1 - m) E^2, not a variance: it depends on where the layer
index starts, so no conclusion may rest on these numbers; they exist to be set beside the reference's output.
One deviation from the reference: a ratio that is not finite in a window (var_l = 0) is left out of that ratio's
mean, where the reference returns NaN.

A window cut by a chunk boundary stays open (`Window`) until the neighbouring chunk is merged, so results do not
depend on chunking beyond floating-point summation order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

REFERENCE_KEYS = ("exp_var_tf", "exp_var_f", "var_l", "rel_var_f", "rel_var_t")
_N_METRICS = len(REFERENCE_KEYS)


@dataclasses.dataclass(frozen=True)
class Window:
    """Reference-mode sums of one context window over the tokens seen so far.

    sums: shape [4] = (T, sum_{t,j} V(q[:, t, j]), sum_{t,j} m1[t, j], sum_{t,j} m2[t, j]) with
    m1 = sum_l l q[l, t, j] and m2 = sum_l l^2 q[l, t, j]; a_row: shape [n_latents], sum_t m1[t, j].
    """

    seq: int
    sums: np.ndarray
    a_row: np.ndarray


@dataclasses.dataclass(frozen=True)
class RefPartial:
    """Reference-mode state of a contiguous token range.

    edges: the first and last windows of the range (one if it holds one window, none if empty), which may
    continue outside it; done: shape [1 + 2 * 5] = (number of closed windows, the sum of each metric over
    them, the number of finite values of each metric).
    """

    edges: tuple[Window, ...]
    done: np.ndarray


def empty_done() -> np.ndarray:
    return np.zeros(1 + 2 * _N_METRICS)


def window_metrics(window: Window, n_latents: int) -> np.ndarray:
    """The reference's five numbers for one complete window, shape [5].

    With N = T * n: exp_var_tf = sum V / N; exp_var_f = sum m2 / N - sum_j A_j^2 / (T^2 n);
    var_l = sum m2 / N - (sum m1 / N)^2; rel_var_f = exp_var_f / var_l; rel_var_t = exp_var_tf / exp_var_f.
    """
    n_tok, sum_var, sum_m1, sum_m2 = window.sums
    size = n_tok * n_latents
    exp_var_tf = sum_var / size
    exp_var_f = sum_m2 / size - float(window.a_row @ window.a_row) / (n_tok * size)
    var_l = sum_m2 / size - (sum_m1 / size) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.divide([exp_var_f, exp_var_tf], [var_l, exp_var_f])
    return np.array([exp_var_tf, exp_var_f, var_l, *ratios])


def close_windows(done: np.ndarray, windows: list[Window], n_latents: int) -> np.ndarray:
    """Add complete windows to `done`; a non-finite ratio (0/0) is left out of that metric's mean."""
    done = done.copy()
    for window in windows:
        metrics = window_metrics(window, n_latents)
        finite = np.isfinite(metrics)
        done[0] += 1
        done[1 : 1 + _N_METRICS] += np.where(finite, metrics, 0.0)
        done[1 + _N_METRICS :] += finite
    return done


def ref_merge(windows: list[Window], done: np.ndarray, n_latents: int) -> RefPartial:
    """Reference state of consecutive windows in token order: joins equal neighbours, closes interior ones."""
    joined: list[Window] = []
    for window in windows:
        if joined and joined[-1].seq == window.seq:
            last = joined.pop()
            window = Window(window.seq, last.sums + window.sums, last.a_row + window.a_row)
        joined.append(window)
    edges = tuple(joined[:1] + joined[1:][-1:])
    return RefPartial(edges, close_windows(done, joined[1:-1], n_latents))


def pair_moments(indices: np.ndarray, values: np.ndarray, n_latents: int) -> tuple[np.ndarray, ...]:
    """Layer moments of every (token, latent) pair that fires in B consecutive tokens.

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
    layer = np.broadcast_to(np.arange(n_layers, dtype=np.float64)[:, None], indices.shape).ravel()
    act_layer = act * layer
    m1_sum = np.bincount(pair_of_entry, weights=act_layer, minlength=len(pairs))
    m2_sum = np.bincount(pair_of_entry, weights=act_layer * layer, minlength=len(pairs))
    token, latent = np.divmod(pairs, n_latents)
    return token, latent, scratch[pairs], m1_sum, m2_sum


def token_batch(
    indices: np.ndarray, values: np.ndarray, sequence: np.ndarray, n_latents: int
) -> tuple[float, list[Window]]:
    """Sums of B consecutive tokens: indices, values [B, L, k] as for `pair_moments`; sequence [B].

    With m1 = M1 / S = E[L|t,j] and m2 = M2 / S per firing pair, returns sum_{t,j} (M2 - M1 m1) and one
    `Window` per run of equal `sequence` (non-firing pairs have q = 0 and add nothing but to T).
    """
    token, latent, s, m1_sum, m2_sum = pair_moments(indices, values, n_latents)
    m1, m2 = m1_sum / s, m2_sum / s
    within = float((m2_sum - m1_sum * m1).sum())
    is_start = np.r_[True, sequence[1:] != sequence[:-1]]
    run = (np.cumsum(is_start) - 1)[token]
    n_runs = int(is_start.sum())
    per_pair = np.stack([np.ones_like(m1), m2 - m1 * m1, m1, m2])
    if n_runs == 1:  # the common case: no window starts inside the batch
        sums = per_pair.sum(1, keepdims=True).T
        sums[0, 0] = len(sequence)
        rows = np.bincount(latent, weights=m1, minlength=n_latents)[None]
    else:
        sums = np.stack([np.bincount(run, weights=w, minlength=n_runs) for w in per_pair], axis=1)
        sums[:, 0] = np.bincount(np.cumsum(is_start) - 1, minlength=n_runs)
        rows = np.bincount(run * n_latents + latent, weights=m1, minlength=n_runs * n_latents)
        rows = rows.reshape(n_runs, n_latents)
    seqs = sequence[is_start]
    return within, [Window(int(seqs[r]), sums[r], rows[r]) for r in range(n_runs)]


def ratio(num: float, den: float) -> float:
    return float(num / den) if den != 0 else float("nan")


def reference_summary(ref: RefPartial, n_latents: int) -> dict[str, Any]:
    """Close the remaining windows; each metric is its unweighted mean over windows (finite values only)."""
    done = close_windows(ref.done, list(ref.edges), n_latents)
    sums, finite = done[1 : 1 + _N_METRICS], done[1 + _N_METRICS :]
    means = {key: ratio(s, c) for key, s, c in zip(REFERENCE_KEYS, sums, finite, strict=True)}
    return {**means, "n_windows": int(done[0])}
