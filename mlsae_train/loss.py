"""Losses and metrics of docs/METHOD.md sections 4 and 5, as pure functions (plus one small stateful tracker).

Notation: B rows, d = d_model, n = n_latents, L = n_layers. A batch mixes rows of every layer; `layer`
[B] gives each row's layer.

Data parallelism (distributed.py): with `all_reduce` (an in-place sum over ranks), a loss sees one rank's rows
of the global batch, sums the statistics it normalises by (counts, means, denominators) over ranks, and returns
this rank's share: the shares summed over ranks are the loss of the global batch, and so are their gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mlsae_cache.core.errors import InputError, StoreError

AUXK_COEF = 1.0 / 32.0
"""Weight of the AuxK loss: L = L_fvu + AUXK_COEF * L_aux (docs/METHOD.md section 4)."""


def _check_rows(x: Tensor, x_hat: Tensor, layer: Tensor, n_layers: int) -> None:
    if x.ndim != 2 or x.shape != x_hat.shape:
        raise InputError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must both be [rows, d_model]")
    if layer.shape != (x.shape[0],):
        raise InputError(f"layer has shape {tuple(layer.shape)}, expected [{x.shape[0]}] (one id per row)")
    if n_layers < 1:
        raise InputError(f"n_layers = {n_layers} must be >= 1")
    if layer.numel() and (int(layer.min()) < 0 or int(layer.max()) >= n_layers):
        raise InputError(
            f"layer ids span [{int(layer.min())}, {int(layer.max())}], outside [0, {n_layers}) "
            "(pass n_layers = number of layers in the cache)"
        )


AUXK_K = 256
"""Default number k_aux of dead latents used by AuxK (capped at n/2 and at the number dead)."""

AllReduce = Callable[[Tensor], Tensor]
"""Sums a tensor over the ranks of a data-parallel run, in place, and returns it."""


class _RowSquaredError(torch.autograd.Function):
    """||x_r - x^_r||^2 per row (the FVU's numerator): x, x_hat [B, d] -> [B], differentiable in x_hat (x is the
    target). One difference is kept for the backward, which is then one product; autograd's sub, pow and sum took
    2.6 ms more per 4,096 x 576 step, forward and backward, on 2 cores (measured)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, x_hat: Tensor) -> Tensor:  # type: ignore[override]
        diff = x - x_hat
        ctx.save_for_backward(diff)
        return torch.linalg.vector_norm(diff, dim=1).square_()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        (diff,) = ctx.saved_tensors
        return None, diff * (-2.0 * grad)[:, None]


def fvu_per_layer(
    x: Tensor,
    x_hat: Tensor,
    layer: Tensor,
    n_layers: int,
    per_dim_mean: bool = True,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """Fraction of variance unexplained of each layer's rows in the batch.

    FVU_l = sum_{r in l} ||x_r - x^_r||^2 / sum_{r in l} ||x_r - m_l||^2, with m_l [d] the per-dimension
    mean of layer l's rows (docs/METHOD.md section 4). per_dim_mean=False uses instead the single scalar mean of
    all entries of those rows (the reference code's variant, for comparison).
    Shapes: x, x_hat [B, d]; layer [B] int64 in [0, n_layers) -> [n_layers]. NaN for a layer without rows
    in the batch, or whose rows have zero variance (FVU undefined). Differentiable in x_hat; x is the target, a
    constant.
    With `all_reduce`, counts, means and denominators are those of the global batch and the numerator this
    rank's: the result is this rank's share of the global FVU (0 for a layer without rows here).
    """
    _check_rows(x, x_hat, layer, n_layers)
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.detach().to(dtype)
    onehot_t = F.one_hot(layer, n_layers).to(dtype).T  # per-layer sums of per-row values as [L, B] x [B] products
    counts, sums = layer_sums(x, layer, n_layers)
    if all_reduce is not None:  # one collective for both: the means need global counts and sums
        stats = all_reduce(torch.cat([counts[:, None], sums], 1))
        counts, sums = stats[:, 0], stats[:, 1:]
    if not per_dim_mean:
        sums = sums.sum(1, keepdim=True).expand_as(sums) / x.shape[1]
    means = sums / counts.clamp_min(1.0)[:, None]
    # x is a constant: the denominator's differences need no graph, and are formed in place in the gathered means
    den = onehot_t @ torch.linalg.vector_norm(means.index_select(0, layer).sub_(x), dim=1).square_()
    if all_reduce is not None:
        den = all_reduce(den)
    num = onehot_t @ _RowSquaredError.apply(x, x_hat.to(dtype))
    defined = den > 0
    return torch.where(defined, num / torch.where(defined, den, 1.0), torch.nan)


def layer_sums(x: Tensor, layer: Tensor, n_layers: int) -> tuple[Tensor, Tensor]:
    """Each layer's number of rows [L] and sum of rows [L, d], in x's dtype: x [B, d], layer [B] in [0, n_layers).

    On a CPU, for float32 and float64 rows, by `_layer_sums` (summed in float64: 0.6 against 1.3 ms for the product
    of a one-hot [L, B] matrix and x, B 4,096, d 576, L 30, 2 cores; index_add_, whose parallel loop stalls on a busy
    2-core machine, had been 10-100x slower there); elsewhere by that product.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        onehot_t = F.one_hot(layer, n_layers).to(x.dtype).T
        return onehot_t.sum(1), onehot_t @ x
    counts, sums = np.zeros(n_layers, np.int64), np.zeros((n_layers, x.shape[1]))
    if not _layer_sums(x.detach().contiguous().numpy(), layer.contiguous().numpy(), counts, sums):
        raise InputError(f"layer ids outside [0, {n_layers}) (pass n_layers = number of layers in the cache)")
    return torch.from_numpy(counts).to(x.dtype), torch.from_numpy(sums).to(x.dtype)


@numba.njit(nogil=True, boundscheck=False, cache=True)
def _layer_sums(x: Any, layer: Any, counts: Any, sums: Any) -> bool:  # pragma: no cover - runs compiled
    """counts[l] += the rows of layer l, sums[l] += their sum, for rows x [B, d] of layers `layer` [B]; False (and
    partial sums) where a layer id lies outside [0, L)."""
    n_layers = counts.shape[0]
    for r in range(x.shape[0]):
        at = layer[r]
        if at < 0 or at >= n_layers:
            return False
        counts[at] += 1
        for j in range(x.shape[1]):
            sums[at, j] += x[r, j]
    return True


def fvu_loss(x: Tensor, x_hat: Tensor, layer: Tensor, n_layers: int) -> Tensor:
    """L_fvu = mean of `fvu_per_layer` over the layers present in the batch; scalar, differentiable."""
    per_layer = fvu_per_layer(x, x_hat, layer, n_layers)
    return per_layer[~per_layer.isnan()].mean()


def auxk_acts(dead_pre: Tensor, k_aux: int, n_latents: int) -> Tensor:
    """AuxK's activations over the dead latents: per row, the ReLU of the k_aux largest of `dead_pre` [B, m] (the
    pre-activations of the m dead latents), the others 0; k_aux is capped at n_latents // 2 and at m (m >= 1).
    -> [B, m], float32 or wider, differentiable in dead_pre."""
    m = dead_pre.shape[1]
    k_eff = min(k_aux, n_latents // 2, m)
    if k_eff < 1:
        raise InputError(f"AuxK needs k_aux >= 1 and a dead latent; got k_aux {k_aux}, {m} dead")
    z = dead_pre.to(torch.promote_types(dead_pre.dtype, torch.float32))
    if k_eff == m:
        return z.relu()
    top, pos = z.topk(k_eff, dim=1, sorted=False)
    return torch.zeros_like(z).scatter(1, pos, top.relu())


def auxk_loss(
    residual: Tensor,
    pre_acts: Tensor,
    dead_mask: Tensor,
    W_dec: Tensor,
    k_aux: int = AUXK_K,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """AuxK loss (Gao et al. 2024; docs/METHOD.md section 4) from all pre-activations z [B, n] and the dead mask
    [n] bool: `auxk_dead_loss` of z's dead columns. A zero scalar (no graph) when no latent is dead. (Training takes
    the dead columns from the encoder, `TopKSAE.forward(x, dead)`.)"""
    dead_ids = dead_mask.nonzero().squeeze(1)
    return auxk_dead_loss(residual, pre_acts.index_select(1, dead_ids), dead_ids, W_dec, k_aux, all_reduce)


def auxk_dead_loss(
    residual: Tensor,
    dead_pre: Tensor,
    dead_ids: Tensor,
    W_dec: Tensor,
    k_aux: int = AUXK_K,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """AuxK loss: the dead latents regress the residual.

    e = residual (x_std - x^_std, detached here in any case); a = `auxk_acts` of dead_pre (each row's k_aux largest
    pre-activations among the dead latents, ReLU'd); e^ = a W_dec[dead_ids], no b_dec; L_aux = ||e - e^||^2 /
    ||e - mean_rows(e)||^2, the mean per dimension. e^ is a dense [B, m] x [m, d] product: the m dead latents are
    usually few, and a matmul over all of them is faster on a CPU than gathering k_aux decoder rows per row.
    Shapes: residual [B, d], dead_pre [B, m], dead_ids [m], W_dec [n, d] -> scalar.
    Returns a zero scalar (no graph) when no latent is dead (m = 0), k_aux is 0, or e has no variance.
    With `all_reduce` (and the same dead latents on every rank), mean_rows(e) and the denominator are those of the
    global batch: the result is this rank's share of the global L_aux.
    """
    if dead_ids.numel() == 0 or k_aux == 0:
        return residual.new_zeros(())
    e = residual.detach()
    acts = auxk_acts(dead_pre, k_aux, W_dec.shape[0])
    e_hat = acts.to(W_dec.dtype) @ W_dec.index_select(0, dead_ids)
    if all_reduce is None:
        den = (e - e.mean(0)).pow(2).sum()
    else:
        stats = all_reduce(torch.cat([e.sum(0), e.new_full((1,), e.shape[0])]))
        den = all_reduce((e - stats[:-1] / stats[-1]).pow(2).sum())
    if not bool(den > 0):
        return residual.new_zeros(())
    return (e - e_hat).pow(2).sum() / den


def total_loss(l_fvu: Tensor, l_aux: Tensor) -> Tensor:
    """L = L_fvu + AUXK_COEF * L_aux."""
    return l_fvu + AUXK_COEF * l_aux


def active_mask(indices: Tensor, n_latents: int, values: Tensor | None = None) -> Tensor:
    """[n] bool: latents that appear in `indices` [B, k] (with a positive value, when values is given)."""
    # counts rather than an indexed store of True: measured 0.18 against 0.80 ms for 131k ids on 2 cores
    weights = None if values is None else (values > 0).reshape(-1).to(torch.float32)
    return torch.bincount(indices.reshape(-1), weights, minlength=n_latents) > 0


def l0(values: Tensor) -> Tensor:
    """Mean number of non-zero latents per row. values [B, k] post-ReLU -> scalar float."""
    return (values > 0).sum(-1).to(torch.float32).mean()


def dead_fraction(dead_mask: Tensor) -> Tensor:
    """Fraction of latents marked dead. dead_mask [n] bool -> scalar float."""
    return dead_mask.to(torch.float32).mean()


def mean_max_cosine(atoms: Tensor, W_dec: Tensor) -> Tensor:
    """Mean over true atoms of the max cosine similarity to any learned decoder row (docs/METHOD.md section 5).

    Shapes: atoms [m, d], W_dec [n, d] -> scalar.
    """
    a = F.normalize(atoms.to(W_dec.dtype), dim=1)
    w = F.normalize(W_dec, dim=1)
    return (a @ w.T).amax(1).mean()


class DeadLatentTracker:
    """Per latent, the number of ROWS since it was last active (docs/METHOD.md section 4).

    The reference counts micro-batches instead of rows; we count rows, so `dead_after_rows` means what it
    says whatever the batch size. A latent is active in a batch when it is among a row's top-k with a
    positive value (or merely among the top-k when `update_` gets no values).
    """

    def __init__(self, n_latents: int, device: torch.device | str = "cpu") -> None:
        if n_latents < 1:
            raise InputError(f"DeadLatentTracker needs n_latents >= 1, got {n_latents}")
        self.rows_since_active = torch.zeros(n_latents, dtype=torch.int64, device=device)

    def update_(self, indices: Tensor, n_rows: int, values: Tensor | None = None) -> None:
        """Advance every counter by n_rows, then zero those of the latents active in indices [B, k]."""
        self.advance_(n_rows, active_mask(indices, self.rows_since_active.numel(), values))

    def advance_(self, n_rows: int, fired: Tensor) -> None:
        """Advance every counter by n_rows, then zero those of the latents in `fired` [n] bool (for a data-parallel
        run: the global batch's rows, and the latents active on any rank)."""
        if n_rows < 0:
            raise InputError(f"n_rows = {n_rows} must be >= 0 (the number of rows in the batch)")
        self.rows_since_active += n_rows
        self.rows_since_active.masked_fill_(fired.to(self.rows_since_active.device), 0)

    def dead_mask(self, dead_after_rows: int) -> Tensor:
        """[n] bool: latents inactive for at least dead_after_rows rows."""
        if dead_after_rows < 1:
            raise InputError(f"dead_after_rows = {dead_after_rows} must be >= 1")
        return self.rows_since_active >= dead_after_rows

    def state_dict(self) -> dict[str, Tensor]:
        """State to store beside a checkpoint for an exact resume."""
        return {"rows_since_active": self.rows_since_active.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `state_dict()`; rejects a state for a different number of latents."""
        counts = state.get("rows_since_active")
        if not isinstance(counts, Tensor) or counts.shape != self.rows_since_active.shape:
            got = None if not isinstance(counts, Tensor) else tuple(counts.shape)
            raise StoreError(
                f"dead-latent state has shape {got}, expected {tuple(self.rows_since_active.shape)} "
                "(resume from the trainer state saved with this SAE)"
            )
        self.rows_since_active = counts.to(self.rows_since_active.device, torch.int64).clone()
