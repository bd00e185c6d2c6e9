"""Harvest on tiny random models: stored rows against a plain forward pass, coordinates, statistics, xarray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from mlsae_cache.harvest import run_harvest
from mlsae_cache.models import LoadedModel, find_blocks, find_final_norm, load_model
from mlsae_cache.store import Cache
from mlsae_cache.text import TextSpec, separator_id, token_stream, windows
from tests.cache.conftest import small_config
from tests.helpers import assert_statistics_close


def reference_windows(tokenizer, spec: TextSpec, ctx: int, n_tokens: int) -> np.ndarray:  # noqa: ANN001
    """Windows computed the obvious way: tokenise every document, join with the separator, cut."""
    from mlsae_cache.text import load_documents

    sep = separator_id(tokenizer)
    ids: list[int] = []
    for doc in load_documents(spec):
        ids += [sep] + tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens + ctx:
            break
    n_windows = min(-(-n_tokens // ctx), len(ids) // ctx)
    return np.asarray(ids[: n_windows * ctx]).reshape(n_windows, ctx)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_stored_rows_equal_hidden_states(tmp_path: Path, tiny_models: dict[str, Path], arch: str) -> None:
    out = tmp_path / "c"
    loaded = load_model(str(tiny_models[arch]), device="cpu")
    run_harvest(small_config(out, tiny_models[arch], dtype="float32", max_tokens=200), loaded=loaded)
    cache = Cache(out)
    win = reference_windows(loaded.tokenizer, TextSpec(), 32, 200)
    with torch.no_grad():
        hs = loaded.model(torch.from_numpy(win), output_hidden_states=True).hidden_states
    n_layers = len(find_blocks(loaded.model))
    stored = cache.activations(0, 200)  # [token, layer, d]
    for layer in range(n_layers - 1):
        want = hs[layer + 1].reshape(-1, hs[0].shape[-1])[:200].numpy()
        np.testing.assert_allclose(stored[:, layer], want, rtol=1e-5, atol=1e-5, err_msg=f"layer {layer}")
    # The last block is stored before the final norm: hidden_states[-1] is the norm of it.
    last = torch.from_numpy(stored[:, -1])
    post_norm = hs[-1].reshape(-1, hs[0].shape[-1])[:200]
    assert not torch.allclose(last, post_norm, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(find_final_norm(loaded.model)(last), post_norm, rtol=1e-5, atol=1e-5)


def test_float16_storage_is_the_rounded_float32(
    tmp_path: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run_harvest(small_config(a, tiny_models["llama"], dtype="float32", max_tokens=300), loaded=loaded_llama)
    run_harvest(small_config(b, tiny_models["llama"], dtype="float16", max_tokens=300), loaded=loaded_llama)
    full = Cache(a).activations(0, 300)
    np.testing.assert_array_equal(Cache(b).activations(0, 300), full.astype(np.float16).astype(np.float32))


def test_bfloat16_storage_round_trips(tmp_path: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run_harvest(small_config(a, tiny_models["llama"], dtype="float32", max_tokens=300), loaded=loaded_llama)
    run_harvest(small_config(b, tiny_models["llama"], dtype="bfloat16", max_tokens=300), loaded=loaded_llama)
    want = torch.from_numpy(Cache(a).activations(0, 300)).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(Cache(b).activations(0, 300), want)
    assert Cache(b).meta.storage_dtype == "bfloat16"


def test_token_coordinates(small_cache: Path, loaded_llama: LoadedModel) -> None:
    cache = Cache(small_cache)
    ctx = cache.meta.context_length
    win = reference_windows(loaded_llama.tokenizer, TextSpec(), ctx, cache.n_tokens)
    ids = cache.token_ids()
    np.testing.assert_array_equal(ids, win.reshape(-1)[: cache.n_tokens])
    index = np.arange(cache.n_tokens)
    np.testing.assert_array_equal(cache.tokens().sequence, index // ctx)
    np.testing.assert_array_equal(cache.tokens().position, index % ctx)
    special = set(loaded_llama.tokenizer.all_special_ids)
    want = np.array([(i % ctx != 0) and (t not in special) for i, t in enumerate(ids)])
    np.testing.assert_array_equal(cache.trainable(), want)
    assert (~want).sum() > cache.n_tokens // ctx  # separators inside windows are excluded too


def test_layer_statistics_match_numpy(small_cache: Path) -> None:
    cache = Cache(small_cache)
    x = cache.activations(0, cache.n_tokens)[cache.trainable()]
    assert_statistics_close(cache.layer_mean(), cache.layer_sq_norm(), x)


def test_open_zarr_gives_named_dims(small_cache: Path) -> None:
    ds = xr.open_zarr(small_cache, consolidated=False)
    assert ds["activations"].dims == ("token", "layer", "d_model")
    assert ds.sizes["token"] == Cache(small_cache).n_tokens == 1000
    assert list(ds["layer"].values) == [0, 1, 2]
    for name in ("token_ids", "sequence", "position", "trainable"):
        assert ds[name].dims == ("token",)
    assert ds["layer_mean"].dims == ("layer", "d_model")
    assert ds["layer_sq_norm"].dims == ("layer",)


def test_layer_subset_and_early_stop(tmp_path: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    run_harvest(small_config(full, tiny_models["llama"], dtype="float32", max_tokens=200), loaded=loaded_llama)
    run_harvest(
        small_config(part, tiny_models["llama"], dtype="float32", max_tokens=200, layers=(1, 0)), loaded=loaded_llama
    )
    assert Cache(part).layers == (0, 1)
    np.testing.assert_array_equal(Cache(part).activations(0, 200), Cache(full).activations(0, 200)[:, :2])


def test_cache_reads_chunks_and_dask(small_cache: Path) -> None:
    cache = Cache(small_cache)
    rows = cache.activations(0, cache.n_tokens)
    np.testing.assert_array_equal(cache.chunk(2, 1), rows[256:384, 1])
    np.testing.assert_array_equal(cache.chunk(cache.n_chunks - 1, 0), rows[896:, 0])
    np.testing.assert_array_equal(cache.dask_activations().compute(), rows)


@pytest.mark.parametrize(
    ("pieces", "ctx", "want"),
    [
        ([[1, 2, 3], [4, 5]], 2, [[1, 2], [3, 4]]),
        ([[1], [2], [3], [4]], 4, [[1, 2, 3, 4]]),
        ([[1, 2, 3, 4, 5, 6, 7]], 3, [[1, 2, 3], [4, 5, 6]]),
        ([[1, 2]], 3, []),
    ],
    ids=["across-documents", "many-short", "one-long", "too-short"],
)
def test_windows_cut_the_stream(pieces: list[list[int]], ctx: int, want: list[list[int]]) -> None:
    got = [w.tolist() for w in windows((np.asarray(p) for p in pieces), ctx)]
    assert got == want


def test_separator_goes_before_each_document(loaded_llama: LoadedModel) -> None:
    tok = loaded_llama.tokenizer
    docs = ["alpha beta", "gamma"]
    got = [p.tolist() for p in token_stream(docs, tok)]
    assert got == [[tok.eos_token_id] + tok(d, add_special_tokens=False)["input_ids"] for d in docs]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".txt"])
def test_local_dataset_files(
    tmp_path: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel, suffix: str
) -> None:
    import pandas as pd

    docs = [f"Document number {i} talks about the {i}th subject at length. " * 3 for i in range(30)]
    path = tmp_path / f"docs{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(docs))
    else:
        frame = pd.DataFrame({"body": docs})
        {
            ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
            ".json": lambda: frame.to_json(path, orient="records"),
            ".parquet": lambda: frame.to_parquet(path),
        }[suffix]()
    column = "text" if suffix == ".txt" else "body"
    out = tmp_path / "c"
    run_harvest(
        small_config(out, tiny_models["llama"], dataset=str(path), text_column=column, max_tokens=None),
        loaded=loaded_llama,
    )
    cache = Cache(out)
    assert cache.meta.complete and cache.meta.exhausted
    win = reference_windows(loaded_llama.tokenizer, TextSpec(str(path), text_column=column), 32, 10**9)
    np.testing.assert_array_equal(cache.token_ids(), win[: cache.n_tokens // 32].reshape(-1))


def test_streaming_gives_the_same_rows(
    tmp_path: Path, text_file: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run_harvest(small_config(a, tiny_models["llama"], dataset=str(text_file), max_tokens=400), loaded=loaded_llama)
    run_harvest(
        small_config(b, tiny_models["llama"], dataset=str(text_file), max_tokens=400, streaming=True),
        loaded=loaded_llama,
    )
    np.testing.assert_array_equal(Cache(a).activations(0, 400), Cache(b).activations(0, 400))


def test_bfloat16_compute_is_close_to_float32(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out, dtype in ((a, "float32"), (b, "bfloat16")):
        loaded = load_model(str(tiny_models["llama"]), device="cpu", compute_dtype=dtype)
        run_harvest(
            small_config(out, tiny_models["llama"], dtype="float32", max_tokens=200, compute_dtype=dtype), loaded=loaded
        )
    assert Cache(b).meta.model["compute_dtype"] == "bfloat16"
    assert Cache(a).meta.fingerprint != Cache(b).meta.fingerprint
    x, y = Cache(a).activations(0, 200), Cache(b).activations(0, 200)
    assert not np.array_equal(x, y)
    np.testing.assert_allclose(y, x, rtol=0.05, atol=0.05)
