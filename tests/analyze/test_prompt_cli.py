"""prompt-heatmap and examples on a cache harvested from the tiny random Llama: decoded text, and the prompt's
per-layer latents against a reference built from the model's hidden states."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlsae_analyze.cli import main
from mlsae_analyze.encode import EncodeConfig, run_encode
from mlsae_analyze.example_pages import TSV_COLUMNS, visible
from mlsae_cache.harvest import run_harvest
from mlsae_cache.models import load_model
from mlsae_train.checkpoint import load_sae
from mlsae_train.config import TrainConfig
from mlsae_train.trainer import fit
from tests.analyze.test_plots import PNG_SIGNATURE
from tests.cache.conftest import small_config
from tests.train.conftest import import_npy

PROMPT = "The return statement leaves the current function call."


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(main, ["--quiet", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def llama_sae(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> dict[str, Path]:
    """A cache of blocks 0 and 1 of the tiny Llama (not the last block, whose hidden state is after the final
    norm), a tiny SAE trained on it, and its latents."""
    root = tmp_path_factory.mktemp("llama")
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    run_harvest(small_config(root / "cache", tiny_models["llama"], dtype="float32", layers=(0, 1)), loaded=loaded)
    cfg = TrainConfig(
        root / "cache", root / "sae", expansion_factor=2, k=4, batch_rows=128, max_rows=2000, device="cpu"
    )
    fit(cfg)
    run_encode(EncodeConfig(root / "sae", root / "cache", root / "lat", device="cpu"))
    return {
        "root": root,
        "cache": root / "cache",
        "sae": root / "sae",
        "lat": root / "lat",
        "model": tiny_models["llama"],
    }


def reference_probs(paths: dict[str, Path]) -> tuple[list[int], np.ndarray, list[str]]:
    """Active latents, P_j(l) [2, m] and kept tokens from output_hidden_states and the SAE forward pass."""
    loaded = load_model(str(paths["model"]), device="cpu")
    tok = loaded.tokenizer
    ids = [tok.eos_token_id, *tok(PROMPT, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        hidden = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    sae, _ = load_sae(paths["sae"])
    totals = np.zeros((2, sae.cfg.n_latents))
    for layer in (0, 1):
        with torch.no_grad():
            out = sae(hidden[layer + 1][0, 1:].float())  # block l's output; position 0 skipped
        np.add.at(totals[layer], out.indices.numpy().ravel(), out.values.numpy().ravel())
    active = np.flatnonzero(totals.sum(0) > 0)
    return active.tolist(), totals[:, active] / totals[:, active].sum(0), [tok.decode([i]) for i in ids[1:]]


def test_prompt_heatmap_matches_the_hidden_states(tmp_path: Path, llama_sae: dict[str, Path]) -> None:
    out = tmp_path / "prompt"
    result = invoke(
        "prompt-heatmap", str(llama_sae["sae"]), str(llama_sae["cache"]), str(out), "--text", PROMPT, "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert (out / "prompt_heatmap.png").read_bytes().startswith(PNG_SIGNATURE)
    got = json.loads((out / "prompt.json").read_text())
    latents, probs, tokens = reference_probs(llama_sae)
    assert got["text"] == PROMPT and got["layers"] == [0, 1] and got["tokens"] == tokens
    assert got["latents"] == latents
    np.testing.assert_allclose(got["probs"], probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["layer_mean"], probs[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["empty-text", "too-long", "imported-cache", "sae-d-model"])
def test_prompt_heatmap_bad_input(tmp_path: Path, llama_sae: dict[str, Path], case: str) -> None:
    sae, cache, text = llama_sae["sae"], llama_sae["cache"], PROMPT
    if case == "empty-text":
        text = "  "
    elif case == "too-long":
        text = PROMPT * 20  # the cache's context length is 32 tokens
    elif case == "imported-cache":
        cache = import_npy(tmp_path, np.ones((64, 2, 32), np.float32), "imported")
    else:
        cache = import_npy(tmp_path, np.ones((64, 2, 8), np.float32), "narrow")
    result = invoke("prompt-heatmap", str(sae), str(cache), str(tmp_path / "out"), "--text", text, "--device", "cpu")
    assert result.exit_code == 2 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_examples_command_decodes_with_the_caches_tokenizer(tmp_path: Path, llama_sae: dict[str, Path]) -> None:
    out = tmp_path / "ex"
    result = invoke("examples", str(llama_sae["lat"]), str(out), "--top", "3", "--per-layer", "2", "--context", "3")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no fallback note
    tok = load_model(str(llama_sae["model"]), device="cpu").tokenizer
    rows = [
        dict(zip(TSV_COLUMNS, line.split("\t"), strict=True))
        for line in (out / "examples.tsv").read_text().splitlines()[1:]
    ]
    assert len({r["latent"] for r in rows}) == 3 and rows
    for row in rows:
        assert row["token"] == visible(tok.decode([int(row["token_id"])]))
        assert row["layer"] in {"0", "1"} and row["position"] != "0"  # position 0 is not trainable
    page = (out / "examples.html").read_text()
    assert page.count("class='focus'") == len(rows)
    again = invoke("examples", str(llama_sae["lat"]), str(out), "--latents", rows[0]["latent"])
    assert again.exit_code == 0


@pytest.mark.parametrize(
    "args", [["--top", "2", "--latents", "1"], ["--latents", "1,x"], ["--latents", "999"], ["--per-layer", "0"]]
)
def test_examples_bad_input(tmp_path: Path, llama_sae: dict[str, Path], args: list[str]) -> None:
    result = invoke("examples", str(llama_sae["lat"]), str(tmp_path / "ex"), *args)
    assert result.exit_code == 2 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "ex").exists()
