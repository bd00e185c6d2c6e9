"""The mlsae-cache command line: options in sync with the config, one-line errors that leave nothing behind,
import, info and verify."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from mlsae_cache.cli import main
from mlsae_cache.store import Cache
from tests.cache.test_resume import store_files
from tests.helpers import assert_statistics_close

SMALL = [
    "--context-length",
    "32",
    "--max-tokens",
    "300",
    "--batch-size",
    "4",
    "--chunk-tokens",
    "128",
    "--device",
    "cpu",
]


def run(*args: str):  # noqa: ANN201
    return CliRunner().invoke(main, ["--quiet", *args], catch_exceptions=False)


def test_harvest_then_info_and_verify(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    out = tmp_path / "c"
    result = run("harvest", str(out), "--model", str(tiny_models["gpt_neox"]), "--layers", "0,2", *SMALL)
    assert result.exit_code == 0, result.stderr
    assert "300 tokens x 2 layers" in result.stdout
    again = run("harvest", str(out), "--model", str(tiny_models["gpt_neox"]), "--layers", "0,2", *SMALL)
    assert again.exit_code == 0 and "nothing to do" in again.stdout
    facts = json.loads(run("info", str(out), "--json").stdout)
    assert facts["tokens"] == 300 and facts["layers"] == [0, 2] and facts["complete"] is True
    assert facts["architecture"] == "GPTNeoXForCausalLM" and facts["bytes_on_disk"] > 300 * 2 * 32 * 2
    assert "tokens" in run("info", str(out)).stdout
    ok = run("verify", str(out))
    assert ok.exit_code == 0 and "chunks verified" in ok.stdout


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_finds_a_flipped_byte_and_a_missing_chunk(small_cache: Path) -> None:
    chunk = small_cache / "activations" / "c" / "3" / "1" / "0"
    _flip_byte(chunk)
    bad = run("verify", str(small_cache))
    assert bad.exit_code == 1 and "activations/c/3/1/0" in bad.stderr and "corrupted" in bad.stderr
    chunk.unlink()
    missing = run("verify", str(small_cache))
    assert missing.exit_code == 1 and "missing" in missing.stderr


def test_import_round_trips_an_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(500, 3, 16)).astype(np.float32)
    ids = rng.integers(0, 100, 500).astype(np.int32)
    np.save(tmp_path / "a.npy", acts)
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "c"
    result = run(
        "import",
        str(out),
        "--activations",
        str(tmp_path / "a.npy"),
        "--token-ids",
        str(tmp_path / "ids.npy"),
        "--context-length",
        "50",
        "--chunk-tokens",
        "64",
    )
    assert result.exit_code == 0, result.stderr
    cache = Cache(out)
    np.testing.assert_array_equal(cache.activations(0, 500), acts)
    np.testing.assert_array_equal(cache.token_ids(), ids)
    np.testing.assert_array_equal(cache.tokens().sequence, np.arange(500) // 50)
    assert cache.trainable().all() and cache.meta.complete
    assert_statistics_close(cache.layer_mean(), cache.layer_sq_norm(), acts)
    assert run("verify", str(out)).exit_code == 0
    refused = run("import", str(out), "--activations", str(tmp_path / "a.npy"))
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr


@pytest.fixture(scope="module")
def overflowing_model(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its embeddings scaled so the residual stream exceeds float16's range."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("overflow")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e7)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(path)
    return path


def _bad_inputs(tmp: Path, models: dict[str, Path], overflow: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    short = tmp / "short.jsonl"
    short.write_text('{"text": "hi"}\n')
    llama = ["--model", str(models["llama"])]
    return {
        "missing-model-dir": (["--model", str(tmp / "no_such_model")], "does not exist"),
        "unknown-model-id": (["--model", "nobody/no-such-model-xyz"], "could not load model"),
        "missing-dataset-file": ([*llama, "--dataset", str(tmp / "nope.jsonl")], "does not exist"),
        "missing-text-column": ([*llama, "--dataset", str(short), "--text-column", "body"], "no column 'body'"),
        "empty-text": ([*llama, "--dataset", str(empty)], "less text than one window"),
        "shorter-than-window": ([*llama, "--dataset", str(short)], "less text than one window"),
        "layers-out-of-range": ([*llama, "--layers", "0,7"], "blocks [7]"),
        "context-length-0": ([*llama, "--context-length", "0"], "--context-length must be at least 1"),
        "float16-overflow": (["--model", str(overflow)], "--dtype float32"),
    }


CASES = [
    "missing-model-dir",
    "unknown-model-id",
    "missing-dataset-file",
    "missing-text-column",
    "empty-text",
    "shorter-than-window",
    "layers-out-of-range",
    "context-length-0",
    "float16-overflow",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_error_and_no_store(
    tmp_path: Path, tiny_models: dict[str, Path], overflowing_model: Path, case: str
) -> None:
    args, message = _bad_inputs(tmp_path, tiny_models, overflowing_model)[case]
    out = tmp_path / "out"
    result = run("harvest", str(out), *SMALL, *args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["out-is-a-file", "out-is-a-foreign-dir", "out-is-another-models-cache"])
def test_bad_out_is_left_untouched(tmp_path: Path, tiny_models: dict[str, Path], small_cache: Path, case: str) -> None:
    if case == "out-is-a-file":
        out = tmp_path / "file"
        out.write_text("not a cache")
    elif case == "out-is-a-foreign-dir":
        out = tmp_path / "foreign"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out = small_cache
    before = store_files(out) if out.is_dir() else out.read_bytes()
    result = run("harvest", str(out), "--model", str(tiny_models["gpt_neox"]), *SMALL)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (store_files(out) if out.is_dir() else out.read_bytes()) == before
    if case == "out-is-another-models-cache":
        assert "GPTNeoXForCausalLM" in result.stderr and "--overwrite" in result.stderr


def test_info_on_a_non_cache(tmp_path: Path) -> None:
    result = run("info", str(tmp_path))
    assert result.exit_code == 2 and "not an mlsae cache" in result.stderr
    assert run("info", str(tmp_path / "absent")).exit_code == 2


def test_ctrl_c_is_one_line_and_keeps_committed_work(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    harvest_module = importlib.import_module("mlsae_cache.harvest")
    write_rows = harvest_module.write_rows

    def interrupted_after_two_batches(commit: Any, batches: Any, maker: Any, progress: Any, *rest: Any) -> Any:
        calls = []

        def ctrl_c(n: int, **facts: object) -> None:
            progress(n, **facts)
            calls.append(n)
            if len(calls) == 2:
                raise KeyboardInterrupt

        return write_rows(commit, batches, maker, ctrl_c, *rest)

    out = tmp_path / "c"
    monkeypatch.setattr(harvest_module, "write_rows", interrupted_after_two_batches)
    result = run("harvest", str(out), "--model", str(tiny_models["llama"]), *SMALL)
    assert result.exit_code == 130 and result.stderr.count("\n") == 1, result.stderr
    committed = Cache(out).meta.n_tokens
    assert f"interrupted: {committed:,} tokens are committed" in result.stderr
    assert "re-run the same command" in result.stderr and 0 < committed < 300
    monkeypatch.setattr(harvest_module, "write_rows", write_rows)
    assert run("harvest", str(out), "--model", str(tiny_models["llama"]), *SMALL).exit_code == 0
    assert Cache(out).meta.complete
