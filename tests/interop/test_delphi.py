"""delphi itself reads our latents: `export-delphi` writes its latent cache layout, and delphi's `LatentDataset`
gives back every active latent of every trainable row, with its window, position and activation, and the tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlsae_analyze.cli import main as analyze_main
from mlsae_analyze.encode import EncodeConfig, run_encode
from mlsae_analyze.latents import Latents
from tests.interop.conftest import CONTEXT, saved_sae
from tests.interop.venv import run_interop

READ = """
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer
from delphi.config import ConstructorConfig, SamplerConfig
from delphi.latents import LatentDataset
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
dataset = LatentDataset("delphi/latents", SamplerConfig(), ConstructorConfig(), tokenizer=tokenizer)
rows, acts = [], []
for buffer in dataset.buffers:
    module = sorted(dataset.modules).index(buffer.module_path)
    for data in buffer:
        loc = data.activation_data.locations
        assert data.latent.module_name == buffer.module_path
        rows.append(torch.cat([torch.full((len(loc), 1), module), loc], 1))
        acts.append(data.activation_data.activations.float())
out = {"rows": torch.cat(rows), "acts": torch.cat(acts), "tokens": dataset.tokens.contiguous()}
save_file(out, "out.safetensors")
print(sorted(dataset.modules))
"""


def expected(latents: Latents, pooled: bool) -> tuple[np.ndarray, np.ndarray]:
    """(module, window, position, latent) and activation of every active latent of a trainable row, sorted."""
    chunk = latents.chunk(0, latents.n_tokens)
    n_layers = len(latents.layers)
    r, j, slot = np.nonzero((chunk.values > 0) & chunk.tokens.trainable[:, None, None])
    window, position = r // CONTEXT, r % CONTEXT
    module = np.zeros_like(j) if pooled else j
    row = window * n_layers + j if pooled else window
    keys = np.stack([module, row, position, chunk.indices[r, j, slot]], axis=1)
    return keys, chunk.values[r, j, slot]


def sort_rows(keys: np.ndarray, acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort(keys.T[::-1])
    return keys[order], acts[order]


@pytest.mark.parametrize("pooled", [False, True], ids=["per-layer", "pooled"])
def test_delphi_reads_the_export_with_its_latent_dataset(
    tmp_path: Path, cache: Path, tiny_models: dict[str, Path], pooled: bool
) -> None:
    sae_dir = saved_sae(tmp_path / "sae", cache, standardize=True)
    run_encode(EncodeConfig(sae_dir, cache, tmp_path / "latents", device="cpu"))
    from click.testing import CliRunner

    args = ["--quiet", "export-delphi", str(tmp_path / "latents"), str(tmp_path / "delphi"), "--n-splits", "3"]
    result = CliRunner().invoke(analyze_main, [*args, "--pooled"] if pooled else args)
    assert result.exit_code == 0, result.output
    got = run_interop(f"TOKENIZER = {str(tiny_models['llama'])!r}\n{READ}", tmp_path)
    latents = Latents(tmp_path / "latents")
    want_keys, want_acts = sort_rows(*expected(latents, pooled))
    got_keys, got_acts = sort_rows(got["rows"].astype(np.int64), got["acts"])
    np.testing.assert_array_equal(got_keys, want_keys)
    np.testing.assert_array_equal(got_acts, want_acts)
    ids = latents.tokens().token_ids.reshape(-1, CONTEXT)
    np.testing.assert_array_equal(got["tokens"], np.repeat(ids, 3, axis=0) if pooled else ids)
    config = json.loads(next((tmp_path / "delphi" / "latents").glob("*/config.json")).read_text())
    assert config["cache_ctx_len"] == CONTEXT and config["mlsae_layers"] == [0, 1, 2]
