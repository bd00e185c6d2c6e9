"""SAE checkpoint round trip, rejection of invalid directories, and the reference-checkpoint converter."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlsae_cache.core.errors import CorruptError, InputError, NotFoundError, StoreError
from mlsae_train.checkpoint import convert_reference, load_sae, save_sae
from mlsae_train.sae import SaeConfig, TopKSAE


def trained_like_sae(d: int = 8, n: int = 24, k: int = 3, standardize: bool = True) -> TopKSAE:
    gen = torch.Generator().manual_seed(0)
    sae = TopKSAE(SaeConfig(d, n, k, standardize), generator=gen)
    with torch.no_grad():
        sae.encoder.bias.copy_(torch.randn(n, generator=gen))
        sae.b_dec.copy_(torch.randn(d, generator=gen))
    return sae


EXTRA = {"layers": [0, 1, 2], "cache_fingerprint": "abc123", "lr": 1e-4, "dead_after_tokens": 10_000_000}


@pytest.mark.parametrize("standardize", [True, False], ids=["standardize", "raw"])
def test_round_trip(tmp_path: Path, standardize: bool) -> None:
    sae = trained_like_sae(standardize=standardize)
    save_sae(sae, tmp_path / "ckpt", EXTRA)
    loaded, cfg = load_sae(tmp_path / "ckpt")
    assert loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert cfg["format"] == "mlsae-sae" and cfg["version"] == 1
    assert {k: cfg[k] for k in EXTRA} == EXTRA
    assert (cfg["d_model"], cfg["n_latents"], cfg["k"], cfg["standardize"]) == (8, 24, 3, standardize)
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)


def test_file_layout(tmp_path: Path) -> None:
    save_sae(trained_like_sae().double(), tmp_path, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"], "no temp file left"
    with safe_open(str(tmp_path / "sae.safetensors"), framework="pt") as f:
        shapes = {name: (tuple(f.get_tensor(name).shape), f.get_tensor(name).dtype) for name in f.keys()}  # noqa: SIM118
    f32 = torch.float32
    assert shapes == {
        "encoder.weight": ((24, 8), f32),
        "encoder.bias": ((24,), f32),
        "W_dec": ((24, 8), f32),
        "b_dec": ((8,), f32),
    }


def edit_cfg(**changes: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        cfg = json.loads((path / "cfg.json").read_text())
        cfg.update(changes)
        (path / "cfg.json").write_text(json.dumps(cfg))

    return edit


def foreign_tensors(path: Path) -> None:
    """Simulate a save interrupted after the tensors: new tensors beside the old cfg.json."""
    cfg = (path / "cfg.json").read_text()
    save_sae(trained_like_sae(), path, {})
    (path / "cfg.json").write_text(cfg)


def extra_tensor(path: Path) -> None:
    with safe_open(str(path / "sae.safetensors"), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    save_file({**tensors, "W_skip": torch.zeros(8, 8)}, str(path / "sae.safetensors"), metadata=meta)


LENS_TENSORS = {
    "encoder.weight": torch.zeros(30, 10),
    "decoder.weight": torch.zeros(10, 30),
    "pre_encoder_bias": torch.zeros(10),
    "encoder_lens.0.weight": torch.zeros(10, 10),
}


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda p: None, NotFoundError, "does not exist"),
        (lambda p: (p / "cfg.json").unlink(), StoreError, "not an SAE checkpoint"),
        (lambda p: (p / "sae.safetensors").unlink(), StoreError, "no sae.safetensors"),
        (lambda p: (p / "cfg.json").write_text("{not json"), StoreError, "not valid JSON"),
        (edit_cfg(format="sparsify"), StoreError, "import-sae"),
        (edit_cfg(version=2), StoreError, "version 2"),
        (edit_cfg(d_model=9), StoreError, r"\(24, 9\)"),
        (edit_cfg(k=0), StoreError, "invalid SAE configuration"),
        (foreign_tensors, CorruptError, "interrupted"),
        (extra_tensor, StoreError, "W_skip"),
        (lambda p: (p / "sae.safetensors").write_bytes(b"garbage"), StoreError, "not a readable"),
    ],
    ids=[
        "missing-dir",
        "no-cfg",
        "no-tensors",
        "bad-json",
        "wrong-format",
        "unknown-version",
        "shape-mismatch",
        "invalid-k",
        "save-id-mismatch",
        "extra-tensor",
        "garbage-tensors",
    ],
)
def test_load_rejects_invalid(tmp_path: Path, damage: Callable, error: type, match: str) -> None:
    path = tmp_path / "ckpt"
    if error is not NotFoundError:
        save_sae(trained_like_sae(), path, {})
    damage(path)
    with pytest.raises(error, match=match) as info:
        load_sae(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"k": 4}, "conflicts"),
        ({"save_id": "x"}, "conflicts"),
        ({"when": object()}, "JSON"),
        ({"lr": float("nan")}, "JSON"),
    ],
    ids=["core-key-differs", "save-id", "not-serialisable", "nan"],
)
def test_save_rejects_bad_extra_cfg(tmp_path: Path, extra: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        save_sae(trained_like_sae(), tmp_path, extra)
    assert not any(tmp_path.iterdir()), "a rejected save writes nothing"


def test_save_accepts_matching_core_key(tmp_path: Path) -> None:
    save_sae(trained_like_sae(), tmp_path, {"k": 3, "d_model": 8})
    assert load_sae(tmp_path)[1]["k"] == 3


def write_reference(path: Path, d: int, n: int, k: int, standardize: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A checkpoint in the published reference layout (docs/METHOD.md section 8)."""
    rng = np.random.default_rng(seed)
    tensors = {
        "encoder.weight": rng.normal(size=(n, d)).astype(np.float32),
        "decoder.weight": rng.normal(size=(d, n)).astype(np.float32),
        "pre_encoder_bias": rng.normal(size=d).astype(np.float32),
    }
    path.mkdir(parents=True)
    save_file({name: torch.from_numpy(t) for name, t in tensors.items()}, str(path / "model.safetensors"))
    config = {"n_inputs": d, "n_latents": n, "k": k, "standardize": standardize, "auxk": 256}
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def numpy_reference_forward(x: np.ndarray, t: dict[str, np.ndarray], k: int, standardize: bool) -> np.ndarray:
    """The reference model's forward, in its own layout (decoder columns are latents), float64."""
    enc, dec, pre = (t[name].astype(np.float64) for name in ("encoder.weight", "decoder.weight", "pre_encoder_bias"))
    mu = x.mean(1, keepdims=True) if standardize else 0.0
    sigma = x.std(1, ddof=1, keepdims=True) if standardize else 1.0
    xs = (x - mu) / (sigma + 1e-5) if standardize else x
    z = (xs - pre) @ enc.T
    top = np.argsort(-z, axis=1)[:, :k]
    latents = np.zeros_like(z)
    np.put_along_axis(latents, top, np.maximum(np.take_along_axis(z, top, 1), 0.0), axis=1)
    return (latents @ dec.T + pre) * sigma + mu


@pytest.mark.parametrize("standardize", [True, False], ids=["standardize", "raw"])
def test_convert_reference_round_trip(tmp_path: Path, standardize: bool) -> None:
    ref = write_reference(tmp_path / "ref", d=10, n=30, k=4, standardize=standardize)
    convert_reference(tmp_path / "ref", tmp_path / "ours")
    sae, cfg = load_sae(tmp_path / "ours")
    assert sae.cfg == SaeConfig(10, 30, 4, standardize)
    assert cfg["reference_config"]["auxk"] == 256 and cfg["converted_from"] == str(tmp_path / "ref")
    assert (sae.encoder.bias == 0).all()
    x = np.random.default_rng(1).normal(size=(16, 10)) * 4 + 2
    with torch.no_grad():
        got = sae.double()(torch.from_numpy(x)).x_hat.numpy()
    np.testing.assert_allclose(got, numpy_reference_forward(x, ref, 4, standardize), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda p: (p / "config.json").unlink(), StoreError, "no config.json"),
        (lambda p: (p / "config.json").write_text('{"n_inputs": 10, "k": 4}'), StoreError, "n_latents"),
        (
            lambda p: (p / "config.json").write_text('{"n_inputs": 10, "n_latents": 31, "k": 4}'),
            StoreError,
            r"implies \(31, 10\)",
        ),
        (lambda p: (p / "model.safetensors").unlink(), StoreError, "cannot read"),
        (
            lambda p: (p / "config.json").write_text('{"n_inputs": 10, "n_latents": 30, "k": 4, "lens": true}'),
            StoreError,
            "trained on lens-transformed residuals",
        ),
        (lambda p: save_file(LENS_TENSORS, str(p / "model.safetensors")), StoreError, "holds lens translators"),
    ],
    ids=["no-config", "config-missing-key", "shape-mismatch", "no-weights", "lens-config", "lens-tensors"],
)
def test_convert_reference_rejects_invalid(tmp_path: Path, damage: Callable, error: type, match: str) -> None:
    write_reference(tmp_path / "ref", d=10, n=30, k=4, standardize=True)
    damage(tmp_path / "ref")
    with pytest.raises(error, match=match):
        convert_reference(tmp_path / "ref", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_convert_reference_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        convert_reference(tmp_path / "nope", tmp_path / "ours")
