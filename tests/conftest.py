"""Shared fixtures: tiny random models with a tokenizer the tests build themselves, small text files, a small
random cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mlsae_cache.importer import ImportConfig, import_array
from tests.helpers import make_tiny_model, tokenizer_corpus


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _hf_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets and hub caches go to a temporary directory, never the user's."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories written by save_pretrained: random GPT-NeoX and Llama models sharing a small BPE tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("gpt_neox", "llama")}


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    import json

    docs = tokenizer_corpus()
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    return path


def import_npy(root: Path, x: np.ndarray, name: str = "cache", chunk_tokens: int = 256) -> Path:
    np.save(root / f"{name}.npy", x)
    import_array(ImportConfig(out=root / name, activations=root / f"{name}.npy", chunk_tokens=chunk_tokens))
    return root / name


@pytest.fixture(scope="module")
def random_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 tokens x 3 layers x 16 of Gaussian rows with layer scales 1, 3, 10."""
    x = np.random.default_rng(0).normal(size=(2000, 3, 16)) * np.array([1.0, 3.0, 10.0])[None, :, None]
    return import_npy(tmp_path_factory.mktemp("random"), x.astype(np.float32))
