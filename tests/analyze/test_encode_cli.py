"""encode equals the SAE forward pass, resumes after a crash, refuses what does not fit; the variance command
writes what docs/FORMAT.md lists and refuses bad input without leaving anything behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from click.testing import CliRunner

from mlsae_analyze.cli import main
from mlsae_analyze.encode import EncodeConfig, run_encode
from mlsae_analyze.latents import Latents, LatentsMeta
from mlsae_cache.core.zarrstore import set_root_attribute
from mlsae_cache.store import Cache
from mlsae_train.checkpoint import load_sae
from mlsae_train.config import TrainConfig
from mlsae_train.trainer import fit
from tests.cache.test_resume import assert_same_store, store_files
from tests.train.conftest import import_npy


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trained")
    x = np.random.default_rng(0).normal(size=(1200, 3, 16)).astype(np.float32)
    cache = import_npy(root, x, "cache", chunk_tokens=256)
    zarr.open_group(str(cache), mode="r+")["trainable"][::10] = False
    fit(
        TrainConfig(cache=cache, out=root / "sae", expansion_factor=4, k=4, batch_rows=128, max_rows=4000, device="cpu")
    )
    return cache, root / "sae"


def open_latents(path: Path) -> tuple[xr.Dataset, LatentsMeta]:
    latents = Latents(path)
    return latents.to_xarray(), latents.meta


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(main, ["--quiet", *args], catch_exceptions=False)


def test_encode_equals_the_sae_forward_pass(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    cache, sae_dir = trained
    result = invoke("encode", str(sae_dir), str(cache), str(tmp_path / "lat"), "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    ds, meta = open_latents(tmp_path / "lat")
    assert ds["indices"].dims == ("token", "layer", "k") and meta.n_latents == 64 and meta.k == 4
    sae, _ = load_sae(sae_dir)
    store = Cache(cache)
    for layer in range(3):
        with torch.no_grad():
            out = sae(torch.from_numpy(store.activations(0, store.n_tokens, layer)))
        got_i, got_v = ds["indices"].values[:, layer], ds["values"].values[:, layer]
        order_want, order_got = out.indices.argsort(1), np.argsort(got_i, axis=1)
        np.testing.assert_array_equal(
            np.take_along_axis(got_i, order_got, 1), out.indices.gather(1, order_want).numpy()
        )
        np.testing.assert_allclose(
            np.take_along_axis(got_v, order_got, 1), out.values.gather(1, order_want).numpy(), rtol=1e-6, atol=1e-6
        )
    for name in ("token_ids", "sequence", "position", "trainable"):
        np.testing.assert_array_equal(ds[name].values, getattr(store.tokens(), name))


def test_encode_resumes_after_a_crash(
    tmp_path: Path, trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, sae_dir = trained
    run_encode(EncodeConfig(sae_dir, cache, tmp_path / "ref", device="cpu"))
    original, calls = zarr.Array.__setitem__, {"n": 0}

    class Crash(BaseException):
        pass

    def crashing(self, key, value):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 9:
            raise Crash
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", crashing)
    with pytest.raises(Crash):
        run_encode(EncodeConfig(sae_dir, cache, tmp_path / "run", device="cpu"))
    monkeypatch.setattr(zarr.Array, "__setitem__", original)
    assert not json.loads((tmp_path / "run" / "zarr.json").read_text())["attributes"]["mlsae"]["complete"]
    run_encode(EncodeConfig(sae_dir, cache, tmp_path / "run", device="cpu"))
    assert_same_store(tmp_path / "run", tmp_path / "ref")
    again = invoke("encode", str(sae_dir), str(cache), str(tmp_path / "run"), "--device", "cpu")
    assert again.exit_code == 0 and "nothing to do" in again.stdout


def test_encode_refuses_an_sae_of_another_d_model(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    _, sae_dir = trained
    other = import_npy(tmp_path, np.ones((300, 3, 8), np.float32), "narrow")
    result = invoke("encode", str(sae_dir), str(other), str(tmp_path / "lat"), "--device", "cpu")
    assert result.exit_code == 2 and "d_model 16" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "lat").exists()


def test_encode_refuses_latents_of_another_cache(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    cache, sae_dir = trained
    assert invoke("encode", str(sae_dir), str(cache), str(tmp_path / "lat"), "--device", "cpu").exit_code == 0
    before = store_files(tmp_path / "lat")
    other = import_npy(tmp_path, np.random.default_rng(5).normal(size=(300, 3, 16)).astype(np.float32), "other")
    result = invoke("encode", str(sae_dir), str(other), str(tmp_path / "lat"), "--device", "cpu")
    assert result.exit_code == 2 and "another SAE or cache" in result.stderr
    assert store_files(tmp_path / "lat") == before


def test_variance_command_writes_the_dataset_and_summary(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    cache, sae_dir = trained
    run_encode(EncodeConfig(sae_dir, cache, tmp_path / "lat", device="cpu"))
    result = invoke("variance", str(tmp_path / "lat"), str(tmp_path / "var"))
    assert result.exit_code == 0, result.stderr
    ds = xr.open_zarr(tmp_path / "var" / "variance.zarr", consolidated=False)
    for name, dims in {
        "counts": ("layer", "latent"),
        "totals": ("layer", "latent"),
        "probs": ("layer", "latent"),
        "layer_mean": ("latent",),
        "layer_var": ("latent",),
        "layer_std": ("latent",),
        "n_layers_active": ("latent",),
    }.items():
        assert ds[name].dims == dims, name
    summary = json.loads((tmp_path / "var" / "summary.json").read_text())
    assert summary["n_rows"] == 3 * (1200 - 120)
    assert summary["var_within_latent"] <= summary["var_total"] + 1e-12
    assert set(summary["reference"]) >= {"exp_var_tf", "exp_var_f", "var_l", "rel_var_f", "rel_var_t"}
    assert int(ds["counts"].sum()) > 0
    # a second run replaces its own earlier output
    assert invoke("variance", str(tmp_path / "lat"), str(tmp_path / "var")).exit_code == 0


@pytest.mark.parametrize("case", ["not-latents", "incomplete-latents", "foreign-out"])
def test_variance_bad_input(tmp_path: Path, trained: tuple[Path, Path], case: str) -> None:
    cache, sae_dir = trained
    latents, out = tmp_path / "lat", tmp_path / "var"
    run_encode(EncodeConfig(sae_dir, cache, latents, device="cpu"))
    if case == "not-latents":
        latents = cache
    elif case == "incomplete-latents":
        group = zarr.open_group(str(latents), mode="r+")
        set_root_attribute(group, {**group.attrs["mlsae"], "complete": False})  # sealed, as a writer leaves it
    else:
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    before = store_files(out) if out.exists() else None
    result = invoke("variance", str(latents), str(out))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (store_files(out) if out.exists() else None) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".var")]


@pytest.mark.parametrize("sub_block", [256, 48], ids=["whole-chunk", "sub-blocks"])
def test_cosine_equals_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sub_block: int) -> None:
    monkeypatch.setattr("mlsae_analyze.cosine.COSINE_TOKENS", sub_block)  # 48: sub-blocks cut across the excluded rows
    rng = np.random.default_rng(3)
    base = rng.normal(size=(700, 1, 12))
    x = (base + 0.5 * rng.normal(size=(700, 4, 12)) + np.arange(4)[None, :, None]).astype(np.float32)
    cache = import_npy(tmp_path, x, "cos", chunk_tokens=128)
    zarr.open_group(str(cache), mode="r+")["trainable"][:50] = False
    result = invoke("cosine", str(cache), str(tmp_path / "out"), "--scheduler", "sync")
    assert result.exit_code == 0, result.stderr
    got = json.loads((tmp_path / "out" / "cosine.json").read_text())
    # m_l is the cache's stored layer mean (here over all 700 rows: trainable was changed after the import)
    xc = x[50:].astype(np.float64) - Cache(cache).layer_mean()
    want = [
        np.mean(
            np.sum(xc[:, i] * xc[:, i + 1], 1) / np.linalg.norm(xc[:, i], axis=1) / np.linalg.norm(xc[:, i + 1], axis=1)
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(got["cosine"], want, rtol=1e-9)
    assert got["layer_pairs"] == [[0, 1], [1, 2], [2, 3]] and got["n_tokens"] == 650
