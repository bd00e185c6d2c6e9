from __future__ import annotations

from pathlib import Path

import pytest

from mlsae_cache.config import HarvestConfig
from mlsae_cache.harvest import run_harvest
from mlsae_cache.models import load_model


@pytest.fixture(scope="session")
def loaded_llama(tiny_models: dict[str, Path]):  # noqa: ANN201
    return load_model(str(tiny_models["llama"]), device="cpu")


def small_config(out: Path, model: Path, **overrides: object) -> HarvestConfig:
    base = {
        "out": out,
        "model": str(model),
        "context_length": 32,
        "max_tokens": 1000,
        "batch_windows": 4,
        "chunk_tokens": 128,
        "device": "cpu",
    }
    base.update(overrides)
    return HarvestConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def small_cache(tmp_path: Path, tiny_models: dict[str, Path], loaded_llama) -> Path:  # noqa: ANN001
    out = tmp_path / "cache"
    run_harvest(small_config(out, tiny_models["llama"], dtype="float32"), loaded=loaded_llama)
    return out
