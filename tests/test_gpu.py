"""The CUDA path against the CPU one (marked `gpu`: skipped without CUDA; run them on a machine with a GPU)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlsae_cache.harvest import run_harvest
from mlsae_cache.models import load_model
from mlsae_cache.store import Cache
from mlsae_train.config import TrainConfig
from mlsae_train.loader import LoaderConfig, RowLoader
from mlsae_train.trainer import fit
from tests.cache.conftest import small_config
from tests.train.conftest import import_npy
from tests.train.test_trainer import SMALL

pytestmark = pytest.mark.gpu


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    x = np.random.default_rng(0).normal(size=(1500, 3, 16)) * np.array([1.0, 3.0, 10.0])[None, :, None]
    return import_npy(tmp_path, x.astype(np.float32))


def test_loader_hands_the_same_batches_to_cuda(cache: Path) -> None:
    """Pinned host memory and non-blocking copies: the batches arrive on the device unchanged."""
    store, cfg = Cache(cache), LoaderConfig(batch_rows=128, block_units=4)
    on_cpu = RowLoader(store, store.layers, cfg, "cpu").batches()
    on_gpu = RowLoader(store, store.layers, cfg, "cuda").batches()
    for _ in range(20):
        (a, pa), (b, pb) = next(on_cpu), next(on_gpu)
        assert b.x.device.type == "cuda" and pa == pb
        assert torch.equal(a.x, b.x.cpu()) and torch.equal(a.layer, b.layer.cpu()) and torch.equal(a.token, b.token)


def test_fit_on_cuda_matches_the_cpu(tmp_path: Path, cache: Path) -> None:
    """The same run on both devices; float32 matmuls and summation orders differ, hence the tolerance."""
    base = TrainConfig(cache=cache, out=tmp_path / "cpu", **SMALL)
    fit(base)
    fit(replace(base, out=tmp_path / "cuda", device="cuda"))
    a, b = load_file(tmp_path / "cpu" / "sae.safetensors"), load_file(tmp_path / "cuda" / "sae.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-3)


def test_harvest_on_cuda_matches_the_cpu(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """The same harvest on both devices (float32 compute): the stored rows agree to float16 rounding."""
    model = tiny_models["llama"]
    for device in ("cpu", "cuda"):
        loaded = load_model(str(model), device=device, compute_dtype="float32")
        run_harvest(small_config(tmp_path / device, model, device=device, compute_dtype="float32"), loaded=loaded)
    a, b = Cache(tmp_path / "cpu"), Cache(tmp_path / "cuda")
    assert a.n_tokens == b.n_tokens == 1000
    np.testing.assert_allclose(b.activations(0, 1000), a.activations(0, 1000), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(b.token_ids(), a.token_ids())
