"""Delta CE and KL by splicing (mlsae_train/splice.py) and the MLSAE vs single-layer comparison, on tiny random
GPT-NeoX and Llama models whose LM head is first fitted to the text, so that destroying the stream costs CE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from mlsae_cache.harvest import run_harvest
from mlsae_cache.hooks import block_output
from mlsae_cache.models import LoadedModel, find_blocks, load_model
from mlsae_cache.store import Cache
from mlsae_cache.text import TextSpec, window_batches
from mlsae_train.checkpoint import save_sae
from mlsae_train.cli import main
from mlsae_train.config import TrainConfig
from mlsae_train.sae import SaeConfig, TopKSAE
from mlsae_train.splice import (
    SpliceConfig,
    cache_window_batches,
    reconstruct,
    splice_evaluate,
    splice_hook,
    spliced,
    token_metrics,
    whole_windows,
)
from mlsae_train.trainer import fit
from tests.cache.conftest import small_config

LAYERS = (0, 1, 2)


class Setup(NamedTuple):
    loaded: LoadedModel
    cache: Cache


def fit_head_(model: nn.Module, token_ids: torch.Tensor, steps: int = 40) -> None:
    """Fit the LM head to predict the next token from the model's own final hidden states (a linear probe), so
    that the clean model beats the unigram and any damage to the stream costs cross-entropy."""
    with torch.no_grad():
        h = model.base_model(input_ids=token_ids).last_hidden_state[:, :-1].reshape(-1, model.config.hidden_size)
    y = token_ids[:, 1:].reshape(-1)
    head = model.get_output_embeddings()
    weight = head.weight.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=0.2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(h @ weight.T, y).backward()
        opt.step()
    with torch.no_grad():
        head.weight.copy_(weight)


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def setup(request: pytest.FixtureRequest, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp(f"splice-{request.param}")
    loaded = load_model(str(tiny_models[request.param]), device="cpu")
    windows = next(window_batches(TextSpec("pydoc"), loaded.tokenizer, 32, 64))
    fit_head_(loaded.model, torch.from_numpy(windows))
    loaded.model.save_pretrained(root / "model")
    loaded.tokenizer.save_pretrained(root / "model")
    loaded = load_model(str(root / "model"), device="cpu")
    run_harvest(small_config(root / "cache", root / "model", dtype="float32", max_tokens=640), loaded=loaded)
    return Setup(loaded, Cache(root / "cache"))


def exact_sae(d_model: int, zero_decoder: bool = False) -> TopKSAE:
    """Encoder rows +e_i and -e_i, k = d_model: the top-k keeps |x_i| on the right sign, so x^ = x exactly.
    With a zero decoder the reconstruction is 0."""
    sae = TopKSAE(SaeConfig(d_model, 2 * d_model, d_model, standardize=False))
    eye = torch.eye(d_model)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.zeros(2 * d_model, d_model) if zero_decoder else torch.cat([eye, -eye]))
    return sae


def n_predictions(cache: Cache) -> int:
    return sum(int(b.trainable[:, :-1].sum()) for b in cache_window_batches(cache, 0, None, 8, None))


def test_exact_reconstruction_changes_nothing_at_any_layer(setup: Setup) -> None:
    result = splice_evaluate(exact_sae(setup.cache.d_model), setup.cache, LAYERS, SpliceConfig(), setup.loaded)
    assert result.layer == list(LAYERS)  # the last block included
    np.testing.assert_allclose(result.delta_ce, 0.0, atol=1e-6)
    np.testing.assert_allclose(result.kl, 0.0, atol=1e-6)
    assert 0 < result.clean_ce < np.log(400)  # the fitted head beats the uniform guess
    assert result.n_windows == 20 and result.n_predicted == n_predictions(setup.cache)


def test_zero_reconstruction_costs_cross_entropy(setup: Setup) -> None:
    sae = exact_sae(setup.cache.d_model, zero_decoder=True)
    result = splice_evaluate(sae, setup.cache, LAYERS, SpliceConfig(max_windows=8, batch_windows=3), setup.loaded)
    assert result.n_windows == 8
    assert all(d > 0.5 for d in result.delta_ce), result.delta_ce
    assert all(k > 0.5 for k in result.kl), result.kl


def capture_blocks(loaded: LoadedModel, token_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output (after any splice hook registered earlier) and the logits."""
    outputs: list[torch.Tensor] = []
    handles = [
        b.register_forward_hook(lambda m, a, o: outputs.append(block_output(o).clone()))
        for b in find_blocks(loaded.model)
    ]
    try:
        with torch.no_grad():
            logits = loaded.model(input_ids=token_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return outputs, logits


@pytest.mark.parametrize("layer", LAYERS)
def test_splice_hook_replaces_exactly_one_block_output(setup: Setup, layer: int) -> None:
    batch = next(cache_window_batches(setup.cache, 0, None, 3, None))
    token_ids, mask = torch.from_numpy(batch.token_ids), torch.from_numpy(batch.trainable)
    sae = TopKSAE(SaeConfig(setup.cache.d_model, 64, 4), generator=torch.Generator().manual_seed(layer))
    blocks = find_blocks(setup.loaded.model)
    clean, clean_logits = capture_blocks(setup.loaded, token_ids)
    with spliced(blocks[layer], sae, mask):
        hooked, hooked_logits = capture_blocks(setup.loaded, token_ids)
    with torch.no_grad():
        expected = torch.where(
            mask[..., None],
            sae(clean[layer].reshape(-1, setup.cache.d_model)).x_hat.view_as(clean[layer]),
            clean[layer],
        )
    for before in range(layer):
        assert torch.equal(hooked[before], clean[before])
    torch.testing.assert_close(hooked[layer], expected)
    assert torch.equal(hooked[layer][~mask], clean[layer][~mask])  # untrainable positions keep the original
    assert not torch.allclose(hooked[layer][mask], clean[layer][mask])
    # The rest of the forward pass is the model's own: a forward whose block `layer` returns `expected` agrees.
    handle = blocks[layer].register_forward_hook(
        lambda m, a, o: (expected, *o[1:]) if isinstance(o, tuple) else expected
    )
    try:
        manual, manual_logits = capture_blocks(setup.loaded, token_ids)
    finally:
        handle.remove()
    for after in range(layer + 1, len(LAYERS)):
        torch.testing.assert_close(hooked[after], manual[after])
        assert not torch.allclose(hooked[after], clean[after])
    torch.testing.assert_close(hooked_logits, manual_logits)
    assert not torch.allclose(hooked_logits, clean_logits)


class TupleBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return x * 2, "extra"


class TensorBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.mark.parametrize("block_type", [TupleBlock, TensorBlock], ids=["tuple", "tensor"])
def test_splice_hook_keeps_the_output_type(block_type: type[nn.Module]) -> None:
    sae = exact_sae(4, zero_decoder=True)
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[False, True, True], [True, False, True]])
    block = block_type()
    block.register_forward_hook(splice_hook(sae, mask, batch_rows=2))
    out: Any = block(x)
    if block_type is TupleBlock:
        assert isinstance(out, tuple) and out[1] == "extra"
    stream = block_output(out)
    assert torch.equal(stream[mask], torch.zeros(4, 4)) and torch.equal(stream[~mask], 2 * x[~mask])


def test_reconstruct_matches_a_dense_forward_in_any_batching() -> None:
    sae = TopKSAE(SaeConfig(8, 32, 3), generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    with torch.no_grad():
        dense = torch.where(mask[..., None], sae(x.reshape(-1, 8)).x_hat.view_as(x), x)
        for batch_rows in (1, 4, 100):
            torch.testing.assert_close(reconstruct(sae, x, mask, batch_rows), dense)


def test_token_metrics_are_per_token_and_match_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    clean = torch.log_softmax(torch.randn(50, 17, generator=gen), -1)
    other = torch.log_softmax(torch.randn(50, 17, generator=gen), -1)
    target = torch.randint(17, (50,), generator=gen)
    ce_clean, ce_spliced, kl, kl_reverse = token_metrics(clean, other, target)
    torch.testing.assert_close(ce_clean, F.cross_entropy(clean, target, reduction="none"))
    torch.testing.assert_close(ce_spliced, F.cross_entropy(other, target, reduction="none"))
    torch.testing.assert_close(kl, F.kl_div(other, clean, log_target=True, reduction="none").sum(-1))
    torch.testing.assert_close(kl_reverse, F.kl_div(clean, other, log_target=True, reduction="none").sum(-1))
    # The mean over tokens: batchmean, not a sum over the sequence (the reference code's bug).
    torch.testing.assert_close(kl.mean(), F.kl_div(other, clean, log_target=True, reduction="batchmean"))


def test_whole_windows_skips_cut_windows() -> None:
    ctx = 4
    sequence = np.repeat(np.arange(5), ctx)[2:-1]  # window 0 loses its head, window 4 its tail
    position = np.tile(np.arange(ctx), 5)[2:-1]
    offsets = whole_windows(sequence, position, ctx)
    np.testing.assert_array_equal(offsets, [2, 6, 10])
    np.testing.assert_array_equal(sequence[offsets], [1, 2, 3])


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(main, ["--quiet", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def llama_setup(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("splice-cli")
    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    run_harvest(small_config(root / "cache", tiny_models["llama"], dtype="float32", max_tokens=640), loaded=loaded)
    return Setup(loaded, Cache(root / "cache"))


def test_eval_splice_writes_delta_ce_and_kl(llama_setup: Setup, tmp_path: Path, text_file: Path) -> None:
    sae_dir = save_sae(exact_sae(llama_setup.cache.d_model), tmp_path / "sae", {"layers": list(LAYERS)})
    cache = str(llama_setup.cache.path)
    for extra in ([], ["--dataset", str(text_file)]):
        out = tmp_path / "eval.json"
        result = invoke("eval", str(sae_dir), cache, "--splice", "--max-windows", "3", "--out", str(out), *extra)
        assert result.exit_code == 0, result.output
        assert "dCE" in result.output and "clean CE" in result.output
        saved = json.loads(out.read_text())
        assert saved["layer"] == list(LAYERS) and saved["n_windows"] == 3
        np.testing.assert_allclose(saved["delta_ce"], 0.0, atol=1e-6)
        np.testing.assert_allclose(saved["kl"], 0.0, atol=1e-6)
        assert saved["clean_ce"] > 0 and len(saved["fvu"]) == 3


def test_eval_refuses_splice_options_without_splice(llama_setup: Setup, tmp_path: Path) -> None:
    sae_dir = save_sae(exact_sae(llama_setup.cache.d_model), tmp_path / "sae", {"layers": list(LAYERS)})
    result = CliRunner().invoke(main, ["eval", str(sae_dir), str(llama_setup.cache.path), "--max-windows", "2"])
    assert result.exit_code == 2 and "--splice" in result.output


@pytest.fixture(scope="module")
def trained(llama_setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An MLSAE and one single-layer SAE per layer, same expansion factor and k, each from `fit`."""
    root = tmp_path_factory.mktemp("compare-saes")
    opts: dict[str, Any] = {
        "expansion_factor": 2,
        "k": 4,
        "batch_rows": 128,
        "max_rows": 768,
        "block_units": 4,
        "device": "cpu",
    }
    runs = {"mlsae": None, **{str(layer): (layer,) for layer in LAYERS}}
    for name, layers in runs.items():
        fit(TrainConfig(cache=llama_setup.cache.path, out=root / name, layers=layers, **opts))
    return {name: root / name for name in runs}


def test_compare_puts_the_saes_side_by_side(llama_setup: Setup, trained: dict[str, Path], tmp_path: Path) -> None:
    singles = [arg for layer in LAYERS for arg in ("--single", f"{layer}={trained[str(layer)]}")]
    out = tmp_path / "cmp"
    cache = str(llama_setup.cache.path)
    result = invoke(
        "compare", str(trained["mlsae"]), str(out), "--cache", cache, *singles, "--splice", "--max-windows", "2"
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "compare.json").read_text())
    assert [row["layer"] for row in saved["rows"]] == list(LAYERS)
    for row in saved["rows"]:
        for kind in ("mlsae", "single"):
            assert set(row[kind]) == {"fvu", "delta_ce", "kl", "kl_clean_spliced", "kl_spliced_clean", "dead_fraction"}
            assert row[kind]["kl_clean_spliced"] == row[kind]["kl"]  # named by direction; `kl` kept as it was
            assert np.isfinite(list(row[kind].values())).all()
    assert saved["n_windows"] == 2 and saved["clean_ce"] > 0
    assert saved["format"] == "mlsae-compare" and saved["version"] == 1
    table = result.output.splitlines()
    names = [f"{m} {k}" for m in ("FVU", "dCE", "KL", "rKL", "dead") for k in ("mlsae", "single")]
    assert table[0].split() == ["layer", *" ".join(names).split()]
    assert [line.split()[0] for line in table[1 : 1 + len(LAYERS)]] == [str(layer) for layer in LAYERS]


def test_compare_without_splice_and_with_a_missing_single(
    llama_setup: Setup, trained: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    cache = str(llama_setup.cache.path)
    result = invoke("compare", str(trained["mlsae"]), str(out), "--cache", cache, "--single", f"1={trained['1']}")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [row["single"] is not None for row in rows] == [False, True, False]
    assert set(rows[0]["mlsae"]) == {"fvu", "dead_fraction"}
    assert result.output.splitlines()[1].split()[2] == "-"  # layer 0 has no single-layer FVU


@pytest.mark.parametrize(
    ("single", "message"),
    [("0=", "LAYER=DIR"), ("x=dir", "LAYER=DIR"), ("0={one}", "trained on layers [1]"), ("7={one}", "not one of")],
    ids=["no-dir", "bad-layer", "wrong-layer", "unknown-layer"],
)
def test_compare_rejects_bad_singles(
    llama_setup: Setup, trained: dict[str, Path], tmp_path: Path, single: str, message: str
) -> None:
    args = [str(trained["mlsae"]), str(tmp_path / "cmp"), "--cache", str(llama_setup.cache.path)]
    result = CliRunner().invoke(main, ["compare", *args, "--single", single.format(one=trained["1"])])
    assert result.exit_code == 2 and message in result.output, result.output


def test_compare_refuses_splice_options_without_splice(
    llama_setup: Setup, trained: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    args = [str(trained["mlsae"]), str(out), "--cache", str(llama_setup.cache.path), "--batch-windows", "2"]
    result = CliRunner().invoke(main, ["compare", *args])
    assert result.exit_code == 2 and "only apply with --splice" in result.output and not out.exists()


def test_compare_reports_the_rows_of_every_sae_then_the_windows(
    llama_setup: Setup, trained: dict[str, Path], tmp_path: Path
) -> None:
    from mlsae_train.compare import CompareConfig, run_compare

    seen: dict[str, list[tuple[int, dict]]] = {"rows": [], "windows": []}
    singles = tuple((layer, trained[str(layer)]) for layer in LAYERS)
    cfg = CompareConfig(
        trained["mlsae"], tmp_path / "cmp", llama_setup.cache.path, singles, splice=True, max_windows=2, start=128
    )
    run_compare(
        cfg,
        lambda n, /, **facts: seen["rows"].append((n, facts)),
        lambda n, /, **facts: seen["windows"].append((n, facts)),
    )
    n_tokens = llama_setup.cache.n_tokens - 128
    assert seen["rows"][0] == (0, {"total": n_tokens * (1 + len(LAYERS))})
    assert sum(n for n, _ in seen["rows"]) == n_tokens * (1 + len(LAYERS))
    assert all(not facts for _, facts in seen["rows"][1:])
    assert seen["windows"][0] == (0, {}) and sum(n for n, _ in seen["windows"]) == 2  # opened before the work
