"""TopKSAE against an independent numpy implementation of docs/METHOD.md section 3 and a dense autograd version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlsae_cache.core.errors import InputError
from mlsae_train.loss import auxk_dead_loss
from mlsae_train.sae import STD_EPS, SaeConfig, TopKSAE, encoder_product, geometric_median


def random_sae(d: int, n: int, k: int, standardize: bool, seed: int = 0, n_off: int = 0) -> TopKSAE:
    """A float64 SAE with random weights, nonzero b_enc and b_dec.

    The last n_off latents get a bias of -1000, so rows with fewer than k other positive pre-activations
    have top-k entries that the ReLU clips to 0.
    """
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SaeConfig(d, n, k, standardize), generator=gen).double()
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(n, d, generator=gen, dtype=torch.float64))
        sae.encoder.bias.copy_(torch.randn(n, generator=gen, dtype=torch.float64) - 0.5)
        sae.b_dec.copy_(torch.randn(d, generator=gen, dtype=torch.float64))
        sae.encoder.bias[n - n_off :] -= 1000.0
    return sae


def raw_rows(b: int, d: int, seed: int = 1) -> torch.Tensor:
    """Rows with a per-row offset and scale, so standardisation matters."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d)) * rng.uniform(0.5, 20.0, size=(b, 1)) + rng.normal(size=(b, 1)) * 5
    return torch.from_numpy(x)


def numpy_forward(x: np.ndarray, params: dict[str, np.ndarray], k: int, standardize: bool) -> dict:
    """docs/METHOD.md section 3 in numpy, float64."""
    if standardize:
        mu = x.mean(axis=1, keepdims=True)
        sigma = x.std(axis=1, ddof=1, keepdims=True)
        xs = (x - mu) / (sigma + 1e-5)
    else:
        mu, sigma, xs = np.zeros((len(x), 1)), np.ones((len(x), 1)), x
    z = (xs - params["b_dec"]) @ params["encoder.weight"].T + params["encoder.bias"]
    idx = np.argsort(-z, axis=1, kind="stable")[:, :k]
    vals = np.maximum(np.take_along_axis(z, idx, axis=1), 0.0)
    acts = np.zeros_like(z)
    np.put_along_axis(acts, idx, vals, axis=1)
    x_hat_std = acts @ params["W_dec"] + params["b_dec"]
    return {"idx": idx, "vals": vals, "x_hat_std": x_hat_std, "x_hat": sigma * x_hat_std + mu, "x_std": xs}


def by_index(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row's (index, value) pairs by index, so unordered top-k outputs compare."""
    order = np.argsort(indices, axis=1)
    return np.take_along_axis(indices, order, 1), np.take_along_axis(values, order, 1)


@pytest.mark.parametrize("standardize", [True, False], ids=["standardize", "raw"])
def test_forward_matches_numpy(standardize: bool) -> None:
    sae = random_sae(d=12, n=40, k=6, standardize=standardize, n_off=34)
    x = raw_rows(25, 12)
    params = {name: t.detach().numpy() for name, t in sae.state_dict().items()}
    want = numpy_forward(x.numpy(), params, k=6, standardize=standardize)
    with torch.no_grad():
        out = sae(x)
    got_idx, got_vals = by_index(out.indices.numpy(), out.values.numpy())
    want_idx, want_vals = by_index(want["idx"], want["vals"])
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_allclose(got_vals, want_vals, rtol=1e-10, atol=1e-12)
    assert (want_vals == 0).any(), "the case should include top-k entries clipped by the ReLU"
    np.testing.assert_allclose(out.x_std.numpy(), want["x_std"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.x_hat_std.numpy(), want["x_hat_std"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.x_hat.numpy(), want["x_hat"], rtol=1e-10, atol=1e-9)
    assert out.indices.dtype == torch.int64 and out.dead_pre.shape == (25, 0), "no dead mask, no dead columns"


def test_standardize_values_and_identity() -> None:
    x = raw_rows(5, 7)
    std = TopKSAE(SaeConfig(7, 14, 2)).double().standardize(x)
    np.testing.assert_allclose(std.mu.numpy(), x.numpy().mean(1, keepdims=True))
    np.testing.assert_allclose(std.sigma.numpy(), x.numpy().std(1, ddof=1, keepdims=True))
    np.testing.assert_allclose(std.x_std.numpy(), ((x - std.mu) / (std.sigma + STD_EPS)).numpy())
    ident = TopKSAE(SaeConfig(7, 14, 2, standardize=False)).double().standardize(x)
    assert torch.equal(ident.x_std, x) and (ident.mu == 0).all() and (ident.sigma == 1).all()


def dense_loss(sae: TopKSAE, x: torch.Tensor, target: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """The same loss through a dense [B, n] activation matrix and ordinary autograd."""
    we, be, wd, bd = sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec
    mu = x.mean(1, keepdim=True)
    sigma = x.std(1, keepdim=True)
    xs = (x - mu) / (sigma + STD_EPS)
    z = (xs - bd) @ we.T + be
    idx = z.topk(sae.cfg.k, dim=1).indices
    acts = torch.zeros_like(z).scatter(1, idx, z.gather(1, idx).relu())
    x_hat_std = acts @ wd + bd
    loss = ((sigma * x_hat_std + mu - target) ** 2).sum()
    if dead is not None:
        dead_ids = dead.nonzero().squeeze(1)
        k_aux = min(256, sae.cfg.n_latents // 2, dead_ids.numel())
        sub = z[:, dead_ids]
        pos = sub.topk(k_aux, dim=1).indices
        aux = torch.zeros_like(z).scatter(1, dead_ids[pos], sub.gather(1, pos).relu())
        e = (xs - x_hat_std).detach()
        loss = loss + ((e - aux @ wd) ** 2).sum() / ((e - e.mean(0)) ** 2).sum() / 32
    return loss


def sparse_loss(sae: TopKSAE, x: torch.Tensor, target: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    out = sae(x, dead)
    loss = ((out.x_hat - target) ** 2).sum()
    if dead is not None:
        loss = loss + auxk_dead_loss(out.x_std - out.x_hat_std, out.dead_pre, out.dead_ids, sae.W_dec) / 32
    return loss


@pytest.mark.parametrize(
    ("with_auxk", "input_grad"),
    [(False, False), (True, False), (False, True), (True, True), ("all", False)],
    ids=["topk", "topk+auxk", "topk,x-grad", "topk+auxk,x-grad", "topk+auxk,all-dead"],
)
def test_sparse_backward_matches_dense(with_auxk: bool | str, input_grad: bool) -> None:
    """The backward (sparse over the top-k, dense over the dead latents' columns for AuxK) against dense autograd;
    with every latent dead, each row's top-k latents are in AuxK's selection too, and their gradients add up."""
    sae = random_sae(d=10, n=32, k=5, standardize=True, seed=3, n_off=24)
    x = raw_rows(20, 10, seed=4).requires_grad_(input_grad)
    target = raw_rows(20, 10, seed=5)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 4, 9, 17, 20, 30]] = True
    if with_auxk == "all":
        dead[:] = True
        assert sae(x, dead).dead_pre.shape == (20, 32)
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec] + ([x] if input_grad else [])
    got = torch.autograd.grad(sparse_loss(sae, x, target, dead if with_auxk else None), params)
    want = torch.autograd.grad(dense_loss(sae, x, target, dead if with_auxk else None), params)
    for name, g, w in zip(["encoder.weight", "encoder.bias", "W_dec", "b_dec", "x"], got, want, strict=False):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
        assert g.abs().sum() > 0, name


def test_bf16_autocast_is_close_and_keeps_float32_params() -> None:
    gen = torch.Generator().manual_seed(0)
    sae = TopKSAE(SaeConfig(32, 128, 8), generator=gen)
    x = raw_rows(64, 32).float()
    ref = sae(x)
    sae.autocast_dtype = torch.bfloat16
    out = sae(x)
    out.x_hat_std.sum().backward()
    same = (out.indices.sort(1).values == ref.indices.sort(1).values).float().mean()
    rel = (out.x_hat_std - ref.x_hat_std).norm() / ref.x_hat_std.norm()
    assert same > 0.8 and rel < 0.2, (same, rel)
    assert out.values.dtype == torch.float32 and sae.encoder.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_product_is_linear_rounded_once(dtype: torch.dtype) -> None:
    """In bf16 (the bias a column of the cast operands) as close to the exact product as F.linear of the cast
    operands, both rounded once; in float32 F.linear itself."""
    gen = torch.Generator().manual_seed(4)
    x, weight, bias = (
        torch.randn(300, 40, generator=gen),
        torch.randn(70, 40, generator=gen),
        torch.randn(70, generator=gen),
    )
    got = encoder_product(x, weight, bias, dtype)
    assert got.dtype == dtype and got.shape == (300, 70)
    cast = [t.to(dtype).double() for t in (x, weight, bias)]
    exact = cast[0] @ cast[1].T + cast[2]
    want = torch.nn.functional.linear(*[t.to(dtype) for t in (x, weight, bias)])
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:  # the exact sum rounded to bf16, up to the float32 accumulation: at most one bf16 step away
        ulp = torch.finfo(dtype).eps * exact.abs().to(dtype).double()
        assert ((got.double() - exact).abs() <= ulp).all() and ((want.double() - exact).abs() <= ulp).all()
        assert (got != want).float().mean() < 0.01


def test_init_uses_only_the_generator() -> None:
    cfg = SaeConfig(16, 48, 4)
    state = torch.get_rng_state()
    a = TopKSAE(cfg, generator=torch.Generator().manual_seed(7))
    b = TopKSAE(cfg, generator=torch.Generator().manual_seed(7))
    c = TopKSAE(cfg, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be used"
    assert torch.equal(a.encoder.weight, b.encoder.weight) and not torch.equal(a.encoder.weight, c.encoder.weight)
    w = a.encoder.weight.detach()
    assert w.abs().max() <= 1 / 16**0.5 and w.std() > 0.1 / 16**0.5
    torch.testing.assert_close(a.W_dec.detach(), w / w.norm(dim=1, keepdim=True))
    assert (a.encoder.bias == 0).all() and (a.b_dec == 0).all()
    assert sorted(a.state_dict()) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]


def test_decoder_renorm_and_parallel_gradient_removal() -> None:
    sae = random_sae(d=9, n=20, k=3, standardize=True)
    sae.W_dec.grad = torch.randn(20, 9, dtype=torch.float64)
    w = sae.W_dec.detach().clone()
    g = sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder_()
    parallel = ((g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)) * w
    torch.testing.assert_close(sae.W_dec.grad, g - parallel)
    torch.testing.assert_close((sae.W_dec.grad * w).sum(1), torch.zeros(20, dtype=torch.float64))
    sae.set_decoder_norm_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20, dtype=torch.float64))
    torch.testing.assert_close(sae.W_dec.detach(), w / w.norm(dim=1, keepdim=True))


def brute_force_median_2d(points: np.ndarray) -> np.ndarray:
    """Minimise sum_i ||p_i - y|| by grid search, refined around the best point."""
    center = points.mean(0)
    half = np.abs(points - center).max() + 1.0
    for _ in range(6):
        axis = np.linspace(-half, half, 201)
        grid = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2) + center
        cost = np.linalg.norm(grid[:, None, :] - points[None], axis=2).sum(1)
        center, half = grid[cost.argmin()], half / 20
    return center


@pytest.mark.parametrize(
    "points",
    [
        [[0.0, 0.0], [4.0, 0.0], [0.0, 3.0], [5.0, 5.0], [1.0, 2.0], [-3.0, 1.0], [2.0, -2.0]],
        [[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]],
        [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]],
    ],
    ids=["scattered", "collinear", "outlier"],
)
def test_geometric_median_matches_brute_force(points: list) -> None:
    p = np.array(points)
    got = geometric_median(torch.from_numpy(p), n_iter=500).numpy()
    np.testing.assert_allclose(got, brute_force_median_2d(p), atol=1e-4)
    assert not np.allclose(got, p.mean(0), atol=1e-2), "the case should separate median from mean"


def test_init_b_dec_uses_standardized_space() -> None:
    sae = TopKSAE(SaeConfig(6, 12, 2)).double()
    x = raw_rows(50, 6, seed=9)
    sae.init_b_dec_(x, n_iter=500)
    xn = x.numpy()
    xs = (xn - xn.mean(1, keepdims=True)) / (xn.std(1, ddof=1, keepdims=True) + 1e-5)
    b = sae.b_dec.detach().numpy()
    unit = (b - xs) / np.linalg.norm(b - xs, axis=1, keepdims=True)
    assert np.linalg.norm(unit.sum(0)) < 1e-6, "b_dec must minimise the sum of distances to standardised rows"
    assert np.abs(b).max() < 3.0 and np.linalg.norm(b - geometric_median(x).numpy()) > 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"d_model": 8, "n_latents": 16, "k": 0},
        {"d_model": 8, "n_latents": 16, "k": 17},
        {"d_model": 8, "n_latents": 0, "k": 1},
        {"d_model": 0, "n_latents": 16, "k": 1},
        {"d_model": 8, "n_latents": 16, "k": 2.5},
        {"d_model": 8, "n_latents": 16, "k": True},
        {"d_model": 1, "n_latents": 4, "k": 1, "standardize": True},
    ],
    ids=["k=0", "k>n", "n=0", "d=0", "k-float", "k-bool", "d=1-standardize"],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(InputError, match=r"\(|>=|positive integer"):
        SaeConfig(**kwargs)


def test_forward_rejects_wrong_width() -> None:
    sae = TopKSAE(SaeConfig(8, 16, 2))
    with pytest.raises(InputError, match=r"\[rows, 8\]"):
        sae(torch.zeros(3, 9))
