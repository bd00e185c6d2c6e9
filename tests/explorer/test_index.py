"""The index job: every array equals a dense brute force over the planted latents, whatever the chunking; the
stores must belong together; re-runs; the format's record; logit effects against the whole model."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsae_analyze import topn
from mlsae_analyze.explorer import passes
from mlsae_analyze.explorer.build import IndexConfig, run_index
from mlsae_analyze.explorer.index import ARRAY_NAMES, EMPTY, ExplorerIndex, IndexArrays, read_index_meta
from mlsae_analyze.results import VarianceOutput
from mlsae_cache.core.errors import InputError, StoreError
from mlsae_train.checkpoint import load_sae, save_sae
from mlsae_train.sae import SaeConfig, TopKSAE
from tests.explorer.conftest import index_config
from tests.explorer.stores import CONTEXT, D_MODEL, N_LATENTS, N_LAYERS, N_TOKENS, K, Stores, dense, make_stores

TOP, RANDOM, Q, PER_Q, BINS = 20, 20, 5, 4, 32
ROOT = Path(__file__).resolve().parents[2]


def tab_values(a: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per tab: activations [T, N] and each (token, latent)'s layer: tab 0 takes each token's maximum over layers
    (lowest layer on ties), tab 1 + l layer l."""
    out = [(a.max(0), a.argmax(0))]
    out += [(a[layer], np.full(a.shape[1:], layer)) for layer in range(N_LAYERS)]
    return out


def ranked(values: np.ndarray, codes: np.ndarray, n: int) -> tuple[list[int], list[float]]:
    """The n entries of largest value (ties: smaller code first), as codes and values."""
    order = np.lexsort((codes, -values))[:n]
    return codes[order].tolist(), values[order].tolist()


def quantile_edges_reference(hist: np.ndarray, scale_max: float, tab_max: float) -> list[float]:
    """0, then the smallest x where the histogram's CDF (linear inside a bin) reaches q / Q, then the maximum."""
    total = hist.sum()
    if total == 0:
        return [0.0] * (Q + 1)
    width = scale_max / BINS
    edges = [0.0]
    for q in range(1, Q):
        level, below = q / Q, 0.0
        for b, c in enumerate(hist):
            if below + c / total >= level - 1e-12:
                edges.append(min((b + (level - below) / (c / total)) * width, tab_max))
                break
            below += c / total
    return [*edges, tab_max]


def test_index_equals_a_dense_brute_force(index: Path, stores: Stores) -> None:
    got = ExplorerIndex(index).arrays()
    a = dense(stores.planted)
    rows = np.arange(N_TOKENS)
    for tab, (v, layer) in enumerate(tab_values(a)):
        np.testing.assert_array_equal(got.stat_count[:, tab], (v > 0).sum(0))
        np.testing.assert_allclose(got.stat_sum[:, tab], v.sum(0))
        np.testing.assert_allclose(got.stat_sum_sq[:, tab], (v * v).sum(0))
        np.testing.assert_array_equal(got.stat_max[:, tab], v.max(0).astype(np.float32))
        for j in range(N_LATENTS):
            fire = v[:, j] > 0
            codes = rows[fire] * N_LAYERS + layer[fire, j]
            want_codes, want_values = ranked(v[fire, j], codes, TOP)
            assert got.top_code[j, tab, : len(want_codes)].tolist() == want_codes, (tab, j)
            assert (got.top_code[j, tab, len(want_codes) :] == EMPTY).all()
            assert got.top_value[j, tab, : len(want_values)].tolist() == pytest.approx(want_values)
            draws = passes.priority(rows[fire], np.full(fire.sum(), j), N_LATENTS, 0, stream=0)
            assert got.random_code[j, tab, : min(RANDOM, fire.sum())].tolist() == ranked(draws, codes, RANDOM)[0]
            scale = BINS / a[:, :, j].max() if fire.any() else 0.0
            bins = np.minimum((v[fire, j] * scale).astype(np.int64), BINS - 1)
            np.testing.assert_array_equal(got.act_histogram[j, tab], np.bincount(bins, minlength=BINS))
            edges = quantile_edges_reference(got.act_histogram[j, tab], a[:, :, j].max(), v[:, j].max())
            np.testing.assert_allclose(got.quantile_edges[j, tab], edges, rtol=1e-6)
            group = (v[fire, j][:, None] > got.quantile_edges[j, tab, 1:Q].astype(np.float64)).sum(1)
            draws = passes.priority(rows[fire], np.full(fire.sum(), j), N_LATENTS, 0, stream=1)
            for q in range(Q):
                want = ranked(draws[group == q], codes[group == q], PER_Q)[0]
                assert got.quantile_code[j, tab, q, : len(want)].tolist() == want, (tab, j, q)
                assert (got.quantile_code[j, tab, q, len(want) :] == EMPTY).all()
    assert got.stat_count[N_LATENTS - 1].sum() == 0 and (got.top_code[N_LATENTS - 1] == EMPTY).all()


def test_layer_statistics_and_order_equal_the_variance_output_and_a_brute_force(index: Path, stores: Stores) -> None:
    got = ExplorerIndex(index).arrays()
    variance = VarianceOutput.read(stores.variance)
    np.testing.assert_array_equal(got.p_layer, variance.probs.T)
    a = dense(stores.planted)
    at = np.arange(N_LAYERS, dtype=np.float64)[:, None, None]
    mass, first, second = a.sum(0), (at * a).sum(0), (at * at * a).sum(0)  # [T, N]
    spread = np.where(mass > 0, second - first**2 / np.where(mass > 0, mass, 1), 0).sum(0)
    total = mass.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        within = spread / total
        layer_var = (second.sum(0) - first.sum(0) ** 2 / total) / total
    np.testing.assert_allclose(got.within_token_var, within, atol=1e-12)
    np.testing.assert_allclose(got.within_token_var + got.across_token_var, layer_var, atol=1e-9)
    np.testing.assert_allclose(got.std_layer_pos**2, layer_var, atol=1e-9)
    mean = variance.layer_mean
    assert (
        got.order_by_mean_layer.tolist() == np.argsort(np.where(np.isnan(mean), np.inf, mean), kind="stable").tolist()
    )
    assert got.doc_start.tolist() == [*range(0, N_TOKENS, CONTEXT), N_TOKENS]
    meta = read_index_meta(index)
    assert meta.n_rows == int(stores.planted.tokens.trainable.sum()) and meta.n_docs == N_TOKENS // CONTEXT
    assert meta.n_firing == N_LATENTS - 1


def _assert_same(a: IndexArrays, b: IndexArrays) -> None:
    for name in IndexArrays._fields:
        x, y = getattr(a, name), getattr(b, name)
        if name == "logits":
            continue
        if np.issubdtype(x.dtype, np.floating) and name.startswith(("stat_sum", "within", "across")):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_the_index_is_the_same_under_two_chunkings_and_block_sizes(
    tmp_path: Path, stores: Stores, index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = make_stores(tmp_path / "stores", chunk_tokens=96)
    monkeypatch.setattr(passes, "ROWS_PER_BLOCK", 37)
    monkeypatch.setattr(topn, "BUFFER", 200)  # many merges instead of one
    run_index(index_config(other, tmp_path / "index", logits=False))
    _assert_same(ExplorerIndex(index).arrays(), ExplorerIndex(tmp_path / "index").arrays())


@pytest.mark.parametrize("buffer", [1, 7, 10_000])
def test_topk_equals_a_sort(buffer: int) -> None:
    rng = np.random.default_rng(0)
    top = topn.TopN(n_groups=5, n=3, buffer=buffer)
    groups, values = rng.integers(0, 5, 300), np.round(rng.random(300), 1)  # coarse: many ties
    for a in range(0, 300, 17):
        part = slice(a, a + 17)
        top.offer(groups[part], values[part], np.arange(300)[part])
    got_values, got_codes = top.result()
    for g in range(5):
        codes = np.flatnonzero(groups == g)
        want = ranked(values[codes], codes, 3)
        assert (got_codes[g].tolist(), got_values[g].tolist()) == want, g


def test_progress_covers_three_passes(tmp_path: Path, stores: Stores) -> None:
    seen: list[tuple[int, dict]] = []
    run_index(index_config(stores, tmp_path / "index", logits=False), progress=lambda n, **f: seen.append((n, f)))
    assert seen[0][1]["total"] == 3 * N_TOKENS and sum(n for n, _ in seen) == 3 * N_TOKENS
    assert [f["pass"] for n, f in seen if n][:: len(seen) // 3 or 1][:1] == ["1/3"]
    assert {f.get("pass") for n, f in seen if n} == {"1/3", "2/3", "3/3"}


def test_a_rerun_does_nothing_and_other_stores_are_not_replaced(tmp_path: Path, stores: Stores) -> None:
    out = tmp_path / "index"
    first = run_index(index_config(stores, out, logits=False))
    again = run_index(index_config(stores, out, logits=False))
    assert not first.noop and again.noop and "up to date" in again.message
    assert not run_index(index_config(stores, out, logits=False, top=5)).noop  # other options: built again
    assert read_index_meta(out).top == 5
    other = make_stores(tmp_path / "other", seed=1)
    with pytest.raises(StoreError, match="made from other inputs"):
        run_index(index_config(other, out, logits=False))
    assert read_index_meta(out).top == 5  # untouched
    run_index(index_config(other, out, logits=False, overwrite=True))
    assert read_index_meta(out).sources["latents"].path == str(other.latents.resolve())


def test_stores_that_do_not_belong_together_are_refused(tmp_path: Path, stores: Stores) -> None:
    sae = save_sae(TopKSAE(SaeConfig(d_model=D_MODEL, n_latents=N_LATENTS, k=K)), tmp_path / "sae")
    out = tmp_path / "index"
    with pytest.raises(StoreError, match="encoded with another SAE"):
        run_index(IndexConfig(stores.latents, out, stores.variance, sae, logits=False))
    other = make_stores(tmp_path / "other", seed=1)
    with pytest.raises(StoreError, match="computed from other latents"):
        run_index(IndexConfig(stores.latents, out, other.variance, stores.sae, logits=False))
    with pytest.raises(StoreError, match="another cache"):
        run_index(IndexConfig(stores.latents, out, stores.variance, stores.sae, cache=other.cache, logits=False))
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top": 0}, "--top must be an integer in"),
        ({"bins": 1}, "--bins must be an integer in"),
        ({"quantiles": True}, "--quantiles must be"),
        ({"model": "x", "logits": False}, "contradict"),
    ],
    ids=["top", "bins", "bool", "model-and-no-logits"],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        IndexConfig(Path("l"), Path("o"), Path("v"), Path("s"), **options)


def test_the_record_round_trips_and_other_versions_are_refused(tmp_path: Path, index: Path, stores: Stores) -> None:
    meta = read_index_meta(index)
    assert meta.layers == tuple(range(N_LAYERS)) and set(meta.sources) == {"latents", "variance", "sae", "cache"}
    assert "mlsae-analyze index" in meta.rebuild and "--overwrite" in meta.rebuild
    copy = tmp_path / "copy"
    copy.mkdir()
    group = json.loads((index / "zarr.json").read_text())
    group["attributes"]["mlsae"]["version"] = 2
    (copy / "zarr.json").write_text(json.dumps(group))
    with pytest.raises(StoreError, match="format version 2"):
        read_index_meta(copy)
    with pytest.raises(StoreError, match="is an mlsae latents store, not an mlsae explorer index"):
        ExplorerIndex(stores.latents)


def test_without_a_model_the_index_has_no_logit_effects_and_says_why(tmp_path: Path, stores: Stores) -> None:
    run_index(index_config(stores, tmp_path / "index"))  # the imported cache names no model
    meta = read_index_meta(tmp_path / "index")
    assert meta.logits == 0 and "imported" in (meta.logits_note or "")
    assert ExplorerIndex(tmp_path / "index").latent(0).logits is None


def test_logit_effects_equal_the_whole_model(index: Path, stores: Stores, llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama)).eval()
    W_dec = load_sae(stores.sae)[0].W_dec.detach()
    with torch.no_grad():
        norm = model.model.norm
        logits = (norm(W_dec) - norm(torch.zeros(1, D_MODEL))) @ model.get_output_embeddings().weight.T
    got = ExplorerIndex(index).arrays().logits
    assert got is not None
    top, bottom = logits.topk(10, dim=1), logits.topk(10, dim=1, largest=False)
    np.testing.assert_array_equal(got.pos_token, top.indices.numpy())
    np.testing.assert_allclose(got.pos_value, top.values.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.neg_token, bottom.indices.numpy())
    unit = torch.nn.functional.normalize(W_dec, dim=1)
    cos = unit @ unit.T
    cos.fill_diagonal_(-2)
    np.testing.assert_array_equal(ExplorerIndex(index).arrays().similar_latent, cos.topk(10, dim=1).indices.numpy())


def test_only_the_format_module_spells_the_index_array_names() -> None:
    spelled = []
    for path in sorted(ROOT.glob("mlsae_*/**/*.py")):
        if path.name == "index.py" and path.parent.name == "explorer":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ARRAY_NAMES:
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert spelled == []
