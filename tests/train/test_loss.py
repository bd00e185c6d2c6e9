"""Losses, metrics and the dead-latent tracker against numpy references and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlsae_cache.core.errors import InputError, StoreError
from mlsae_train.loss import (
    AUXK_COEF,
    DeadLatentTracker,
    auxk_acts,
    auxk_loss,
    dead_fraction,
    fvu_loss,
    fvu_per_layer,
    l0,
    layer_sums,
    mean_max_cosine,
    total_loss,
)


def numpy_fvu(x: np.ndarray, x_hat: np.ndarray, layer: np.ndarray, n_layers: int, per_dim: bool) -> np.ndarray:
    out = np.full(n_layers, np.nan)
    for l_id in range(n_layers):
        rows = layer == l_id
        if not rows.any():
            continue
        xl = x[rows]
        mean = xl.mean(axis=0) if per_dim else xl.mean()
        den = ((xl - mean) ** 2).sum()
        if den > 0:
            out[l_id] = ((xl - x_hat[rows]) ** 2).sum() / den
    return out


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of layers 0, 2, 3 and 5 of 6; layer 5 has a single row (zero variance, FVU undefined)."""
    rng = np.random.default_rng(0)
    layer = np.array([0] * 7 + [2] * 5 + [3] * 9 + [5])
    rng.shuffle(layer)
    x = rng.normal(size=(len(layer), 4)) * 3 + rng.normal(size=4) * 10 + layer[:, None]
    x_hat = x + rng.normal(size=x.shape)
    return torch.from_numpy(x), torch.from_numpy(x_hat), torch.from_numpy(layer)


@pytest.mark.parametrize("per_dim", [True, False], ids=["per-dim-mean", "scalar-mean"])
def test_fvu_per_layer_matches_numpy(batch: tuple, per_dim: bool) -> None:
    x, x_hat, layer = batch
    got = fvu_per_layer(x, x_hat, layer, 6, per_dim_mean=per_dim).numpy()
    want = numpy_fvu(x.numpy(), x_hat.numpy(), layer.numpy(), 6, per_dim)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isnan(got[[1, 4]]).all() and not np.isnan(got[[0, 2, 3]]).any()
    # one row has zero variance about its own per-dimension mean, but not about a scalar mean
    assert np.isnan(got[5]) == per_dim


def test_per_dim_mean_differs_from_scalar_mean(batch: tuple) -> None:
    x, x_hat, layer = batch
    a = fvu_per_layer(x, x_hat, layer, 6)
    b = fvu_per_layer(x, x_hat, layer, 6, per_dim_mean=False)
    assert not torch.allclose(a[[0, 2, 3]], b[[0, 2, 3]])


def test_fvu_loss_is_mean_over_present_layers_and_differentiable(batch: tuple) -> None:
    x, x_hat, layer = batch
    x_hat = x_hat.clone().requires_grad_()
    loss = fvu_loss(x, x_hat, layer, 6)
    want = np.nanmean(numpy_fvu(x.numpy(), x_hat.detach().numpy(), layer.numpy(), 6, True))
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    assert (x_hat.grad[layer == 5] == 0).all(), "a layer with undefined FVU must not contribute"


@pytest.mark.parametrize(
    ("layer", "n_layers"),
    [([0, 1, 6], 6), ([-1, 0, 1], 6), ([0, 1], 6), ([0, 0, 0], 0)],
    ids=["id-too-large", "negative-id", "wrong-length", "no-layers"],
)
def test_fvu_rejects_bad_layers(layer: list, n_layers: int) -> None:
    x = torch.randn(3, 4)
    with pytest.raises(InputError):
        fvu_per_layer(x, x, torch.tensor(layer), n_layers)


def hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n = 8 latents, d = 3; latents 1, 4, 6 dead. Returns residual, pre_acts, dead_mask, W_dec."""
    pre_acts = torch.tensor(
        [
            [9.0, 0.5, 8.0, 7.0, 2.0, 6.0, -1.0, 5.0],
            [9.0, -3.0, 8.0, 7.0, -2.0, 6.0, 0.25, 5.0],
            [9.0, 1.5, 8.0, 7.0, 0.75, 6.0, 3.0, 5.0],
        ],
        dtype=torch.float64,
    )
    dead = torch.zeros(8, dtype=torch.bool)
    dead[[1, 4, 6]] = True
    W_dec = torch.arange(24, dtype=torch.float64).reshape(8, 3) / 10
    residual = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [3.0, 1.0, 0.0]], dtype=torch.float64)
    return residual, pre_acts, dead, W_dec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_sums_match_numpy_and_the_one_hot_product(dtype: torch.dtype) -> None:
    """Counts and sums per layer (layer 3 of 5 without rows) against float64 numpy, and against the one-hot product
    that other devices run."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(500, 7, generator=gen, dtype=torch.float64) * 100 + 3).to(dtype)
    layer = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (500,), generator=gen)]
    counts, sums = layer_sums(x, layer, 5)
    assert counts.dtype == sums.dtype == dtype and sums.shape == (5, 7)
    want = np.zeros((5, 7))
    np.add.at(want, layer.numpy(), x.double().numpy())
    np.testing.assert_array_equal(counts.numpy(), np.bincount(layer.numpy(), minlength=5))
    np.testing.assert_allclose(sums.double().numpy(), want, rtol=1e-7 if dtype == torch.float32 else 1e-13)
    onehot_t = torch.nn.functional.one_hot(layer, 5).to(dtype).T
    # the product accumulates in x's dtype: equal to its rounding of a sum of 500 values
    torch.testing.assert_close(sums, onehot_t @ x, rtol=0, atol=float(x.abs().sum()) * torch.finfo(dtype).eps)
    with pytest.raises(InputError, match=r"outside \[0, 4\)"):
        layer_sums(x, layer, 4)


def test_auxk_selects_top_dead_latents() -> None:
    """Over the dead latents 1, 4, 6: each row's two largest pre-activations, ReLU'd, the third 0."""
    _, pre_acts, dead, _ = hand_case()
    acts = auxk_acts(pre_acts[:, dead], k_aux=2, n_latents=8)
    assert acts.tolist() == [[0.5, 2.0, 0.0], [0.0, 0.0, 0.25], [1.5, 0.0, 3.0]]


@pytest.mark.parametrize(("k_aux", "want"), [(256, 3), (2, 2), (1, 1)], ids=["capped-by-dead", "k_aux", "one"])
def test_auxk_k_is_capped(k_aux: int, want: int) -> None:
    _, pre_acts, dead, _ = hand_case()
    positive = pre_acts.abs() + 1  # every selected activation is non-zero
    assert ((auxk_acts(positive[:, dead], k_aux, 8) > 0).sum(1) == want).all()
    assert ((auxk_acts(positive, 256, 8) > 0).sum(1) == 4).all(), "capped at n // 2"
    with pytest.raises(InputError, match="a dead latent"):
        auxk_acts(positive[:, :0], k_aux, 8)


def test_auxk_loss_value_and_gradients() -> None:
    residual, pre_acts, dead, W_dec = hand_case()
    pre_acts.requires_grad_()
    W_dec.requires_grad_()
    residual.requires_grad_()
    loss = auxk_loss(residual, pre_acts, dead, W_dec, k_aux=2)
    w, e = W_dec.detach().numpy(), residual.detach().numpy()
    e_hat = np.stack([0.5 * w[1] + 2.0 * w[4], 0.0 * w[4] + 0.25 * w[6], 1.5 * w[1] + 3.0 * w[6]])
    want = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    assert residual.grad is None, "the residual target must be detached"
    assert set(W_dec.grad.abs().sum(1).nonzero().flatten().tolist()) == {1, 4, 6}
    assert (pre_acts.grad[:, ~dead] == 0).all() and pre_acts.grad[0, 1] != 0
    assert pre_acts.grad[1, 4] == 0, "a ReLU-clipped dead latent gets no gradient"


def test_auxk_is_zero_when_none_dead() -> None:
    residual, pre_acts, _, W_dec = hand_case()
    none_dead = torch.zeros(8, dtype=torch.bool)
    l_aux = auxk_loss(residual, pre_acts, none_dead, W_dec)
    assert l_aux.item() == 0.0 and l_aux.shape == ()
    l_fvu = (residual.clone().requires_grad_() ** 2).sum()
    total = total_loss(l_fvu, l_aux)
    total.backward()
    assert total.item() == l_fvu.item()
    assert total_loss(torch.tensor(1.0), torch.tensor(32.0)).item() == 1.0 + 32.0 * AUXK_COEF == 2.0


def test_tracker_counts_rows_not_steps() -> None:
    tracker = DeadLatentTracker(5)
    tracker.update_(torch.tensor([[0, 1], [1, 2]]), n_rows=10)
    assert tracker.rows_since_active.tolist() == [0, 0, 0, 10, 10]
    tracker.update_(torch.tensor([[1]]), n_rows=5)
    assert tracker.rows_since_active.tolist() == [5, 0, 5, 15, 15]
    # top-k membership with a zero (ReLU-clipped) value is not activity
    tracker.update_(torch.tensor([[0, 3]]), n_rows=1, values=torch.tensor([[0.0, 2.0]]))
    assert tracker.rows_since_active.tolist() == [6, 1, 6, 0, 16]
    assert tracker.dead_mask(6).tolist() == [True, False, True, False, True]
    assert tracker.dead_mask(17).tolist() == [False] * 5


def test_tracker_is_independent_of_batch_split() -> None:
    one, many = DeadLatentTracker(3), DeadLatentTracker(3)
    one.update_(torch.tensor([[0]]), n_rows=100)
    for _ in range(4):
        many.update_(torch.tensor([[0]]), n_rows=25)
    assert one.rows_since_active.tolist() == many.rows_since_active.tolist() == [0, 100, 100]
    assert one.dead_mask(100).tolist() == [False, True, True]


def test_tracker_state_round_trip() -> None:
    a = DeadLatentTracker(4)
    a.update_(torch.tensor([[0, 2]]), n_rows=7)
    state = a.state_dict()
    a.update_(torch.tensor([[1]]), n_rows=3)
    assert state["rows_since_active"].tolist() == [0, 7, 0, 7], "state_dict must be a copy"
    b = DeadLatentTracker(4)
    b.load_state_dict(state)
    b.update_(torch.tensor([[1]]), n_rows=3)
    assert torch.equal(a.rows_since_active, b.rows_since_active)
    with pytest.raises(StoreError, match="expected"):
        DeadLatentTracker(5).load_state_dict(state)


@pytest.mark.parametrize(
    "call", [lambda t: t.update_(torch.tensor([[0]]), -1), lambda t: t.dead_mask(0)], ids=["n_rows<0", "after=0"]
)
def test_tracker_rejects_bad_arguments(call: object) -> None:
    with pytest.raises(InputError):
        call(DeadLatentTracker(2))  # type: ignore[operator]


def test_metrics() -> None:
    values = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    assert l0(values).item() == 1.5
    assert dead_fraction(torch.tensor([True, False, False, False])).item() == 0.25
    W_dec = torch.eye(4)
    atoms = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert mean_max_cosine(atoms, W_dec).item() == pytest.approx((1.0 + 2**-0.5) / 2)


def test_fvu_gradient_matches_autograd_of_the_formula(batch: tuple) -> None:
    """The hand-written backward of the FVU's numerator against autograd through the plain formula, in float64."""
    x, x_hat, layer = batch
    leaf = x_hat.clone().requires_grad_()
    (got,) = torch.autograd.grad(fvu_loss(x, leaf, layer, 6), [leaf])
    per_layer = []
    for l_id in (0, 2, 3):  # the layers with a defined FVU
        rows = layer == l_id
        den = (x[rows] - x[rows].mean(0)).pow(2).sum()
        per_layer.append((x[rows] - leaf[rows]).pow(2).sum() / den)
    (want,) = torch.autograd.grad(torch.stack(per_layer).mean(), [leaf])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
