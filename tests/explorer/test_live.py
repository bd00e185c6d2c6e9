"""The live routes on tiny random GPT-NeoX and Llama models (built from configs, harvested, an SAE fitted on them):
every number is checked against a computation written here independently of the explorer: the model run with
plain forward hooks, the SAE called on the captured rows, a splice hook, a steering hook."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import mlsae_analyze.explorer.liveops as ops
from mlsae_analyze.encode import encode_rows
from mlsae_analyze.explorer.app import build_app
from mlsae_analyze.explorer.index import ExplorerIndex
from mlsae_analyze.explorer.live import Edit, LiveModel, load_live_model, positions_fn
from mlsae_analyze.explorer.liveviews import LiveViews
from mlsae_analyze.explorer.store import ExplorerStores
from mlsae_cache.models import find_blocks
from mlsae_cache.store import read_meta
from mlsae_cache.text import separator_id
from mlsae_train.checkpoint import load_sae
from mlsae_train.lens import Lens
from mlsae_train.sae import SaeConfig, TopKSAE
from tests.explorer.live_stores import PROMPT, LiveStores, make_live_stores


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def live_stores(request: pytest.FixtureRequest, tiny_models: dict[str, Path], tmp_path_factory: Any) -> LiveStores:
    return make_live_stores(tmp_path_factory.mktemp(f"live-{request.param}"), tiny_models[request.param])


def _live(s: LiveStores, sae: TopKSAE | None = None, max_prompt_tokens: int = 256) -> LiveModel:
    sae = sae or load_sae(s.sae)[0]
    layers = ExplorerIndex(s.index).meta.layers
    return load_live_model(str(s.model), "cpu", sae, layers, read_meta(s.cache), max_prompt_tokens)


@pytest.fixture(scope="module")
def live(live_stores: LiveStores) -> LiveModel:
    return _live(live_stores)


@pytest.fixture(scope="module")
def client(live_stores: LiveStores, live: LiveModel) -> Iterator[TestClient]:
    stores = ExplorerStores(live_stores.index, {}, None)
    with TestClient(build_app(stores, None, LiveViews(live, stores.index))) as c:
        yield c


def _streams(live: LiveModel, ids: torch.Tensor, hooks: dict[int, Any] | None = None) -> tuple[list, torch.Tensor]:
    """Every block's output and the logits of a plain forward pass, with optional replacing hooks per block."""
    out: list[torch.Tensor] = []
    blocks = find_blocks(live.model)

    def keep(module: Any, args: Any, output: Any) -> None:
        out.append((output[0] if isinstance(output, tuple) else output)[0].detach().clone())

    handles = [b.register_forward_hook(hooks[i]) for i, b in enumerate(blocks) if hooks and i in hooks]
    handles += [b.register_forward_hook(keep) for b in blocks]
    with torch.inference_mode():
        logits = live.model(input_ids=ids[None], use_cache=False).logits[0].float()
    for h in handles:
        h.remove()
    return out, logits


def _replacing(fn: Any) -> Any:
    def hook(module: Any, args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        new = fn(h[0])[None].to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def test_prompt_equals_encode_of_the_same_rows(client: TestClient, live: LiveModel) -> None:
    got = client.post("/api/v1/prompt", json={"text": PROMPT}).json()
    ids = live.loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert len(got["tokens"]) == len(ids) + 1  # the separator the harvest puts first
    assert got["trainable"][0] is False and all(got["trainable"][1:])
    streams, _ = _streams(live, torch.tensor([separator_id(live.loaded.tokenizer), *ids]))
    for pos, layer in enumerate(got["layers"]):
        x = streams[layer].float().numpy()
        indices, values = encode_rows(live.sae, x)
        for p in range(len(ids) + 1):
            want = dict(zip(indices[p].tolist(), values[p].tolist(), strict=True))
            have = dict(zip(got["indices"][pos][p], got["values"][pos][p], strict=True))
            assert want.keys() == have.keys()
            assert np.allclose([have[j] for j in want], list(want.values()), atol=1e-4)
        x_hat = live.sae(torch.from_numpy(x[1:])).x_hat.detach().numpy()
        fvu = ((x[1:] - x_hat) ** 2).sum() / ((x[1:] - x[1:].mean(0)) ** 2).sum()
        assert got["fvu"][pos] == pytest.approx(float(fvu), rel=1e-4)


def test_recon_logits_equal_an_independent_splice(client: TestClient, live: LiveModel) -> None:
    run = live.run(PROMPT)
    position = len(run.ids) - 2
    answers = {}
    for layer in (live.layers[0], live.layers[-1]):
        got = client.post("/api/v1/prompt/logits", json={"text": PROMPT, "layer": layer, "position": position}).json()
        assert got["layer"] == layer

        def splice(x: torch.Tensor) -> torch.Tensor:
            keep = torch.from_numpy(run.trainable)[:, None]
            return torch.where(keep, live.sae(x.float()).x_hat.detach(), x.float())

        _, logits = _streams(live, run.ids, {layer: _replacing(splice)})
        top = torch.topk(logits[position], 10)
        assert [t["value"] for t in got["recon"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [t["token"] for t in got["recon"]] == live.token_text(top.indices)
        change = torch.log_softmax(logits[position], -1) - torch.log_softmax(run.logits[position], -1)
        assert [t["value"] for t in got["increases"]] == pytest.approx(torch.topk(change, 10).values.tolist(), abs=1e-4)
        assert [t["value"] for t in got["decreases"]] == pytest.approx(
            (-torch.topk(-change, 10).values).tolist(), abs=1e-4
        )
        scored = torch.arange(len(run.ids) - 1)[run.trainable[:-1]]
        clean, after = (torch.log_softmax(lg[scored], -1) for lg in (run.logits, logits))
        target = run.ids[1:][scored]
        delta = (after.gather(1, target[:, None]) - clean.gather(1, target[:, None])).mean()
        assert got["delta_ce"] == pytest.approx(-float(delta), abs=1e-5)
        answers[layer] = got["recon"]
    assert answers[live.layers[0]] != answers[live.layers[-1]]


def exact_sae(d_model: int) -> TopKSAE:
    """An SAE that reconstructs every row: latents +e_i and -e_i, k = d_model (relu(x) - relu(-x) = x); without
    standardisation, whose epsilon (sigma / (sigma + 1e-5)) would keep it from being exact."""
    sae = TopKSAE(SaeConfig(d_model=d_model, n_latents=2 * d_model, k=d_model, standardize=False))
    eye = torch.eye(d_model)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_dec.zero_()
    return sae


def test_an_exact_sae_changes_no_logit(live_stores: LiveStores, live: LiveModel) -> None:
    exact = _live(live_stores, exact_sae(live.sae.cfg.d_model))
    run = exact.run(PROMPT)
    for layer in exact.layers:
        spliced = ops.recon_logits(exact, run, layer)
        assert float((spliced.logits - run.logits).abs().max()) < 1e-5
        assert abs(spliced.delta_ce) < 1e-6 and abs(spliced.kl) < 1e-7


def test_steering_by_zero_changes_exactly_nothing(client: TestClient, live: LiveModel) -> None:
    edits = [
        {"latent": 3, "layer": live.layers[0], "factor": 0.0},
        {"latent": 5, "layer": live.layers[-1], "factor": 0},
    ]
    got = client.post("/api/v1/prompt/steer", json={"text": PROMPT, "edits": edits}).json()
    assert len(got["changes"]) == len(live.run(PROMPT).ids)
    assert all(t["value"] == 0.0 for c in got["changes"] for t in c["increases"] + c["decreases"])


@pytest.mark.parametrize("unit", ["raw", "typical"])
def test_a_steering_edit_adds_f_times_the_raw_decoder_direction(
    live: LiveModel, live_stores: LiveStores, unit: str
) -> None:
    views = LiveViews(live, ExplorerIndex(live_stores.index))
    arrays = ExplorerIndex(live_stores.index).arrays()
    run, layer, f = live.run(PROMPT), live.layers[1], 2.5
    j = int(np.argmax(arrays.stat_count[:, 2]))  # a latent that fires at the second layer
    typical = arrays.stat_sum[j, 2] / arrays.stat_count[j, 2]
    apply = ops.edit_fn(live, [Edit(j, layer, f, "add", unit)], positions_fn("all", len(run.ids)), views.typical)
    x = run.streams[layer]
    with torch.inference_mode():
        change = apply(layer, x[None], 0)[0] - x
    sigma = x.float().std(dim=-1, correction=1, keepdim=True)
    scale = f * (typical if unit == "typical" else 1.0)
    assert torch.allclose(change, scale * sigma * live.sae.W_dec[j].detach(), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():  # the re-run from the edited layer equals the whole model with a steering hook
        fast = live.rerun(run, layer, apply(layer, x[None], 0)[0])
        _, slow = _streams(live, run.ids, {layer: _replacing(lambda h: h + scale * sigma * live.sae.W_dec[j])})
    assert torch.allclose(fast, slow, atol=1e-4)


def test_edits_at_later_positions_leave_earlier_logits_alone(live: LiveModel, live_stores: LiveStores) -> None:
    views = LiveViews(live, ExplorerIndex(live_stores.index))
    run = live.run(PROMPT)
    p = len(run.ids) // 2
    for where in (f"only:{p}", f"from:{p}"):
        changes = ops.steer(live, run, [Edit(1, live.layers[0], 10.0, "add", "raw")], where, views.typical, 3)
        assert all(v == 0.0 for c in changes.increases[:p] + changes.decreases[:p] for v in c.values)
        assert max(changes.increases[p].values) > 0


def test_clamp_to_the_current_activation_changes_nothing(live: LiveModel, live_stores: LiveStores) -> None:
    run = live.run(PROMPT)
    layer, p = live.layers[0], 3
    j, value = int(run.indices[0, p, 0]), float(run.values[0, p, 0])
    views = LiveViews(live, ExplorerIndex(live_stores.index))
    apply = ops.edit_fn(
        live, [Edit(j, layer, value, "clamp", "raw")], positions_fn(f"only:{p}", len(run.ids)), views.typical
    )
    x = run.streams[layer]
    with torch.inference_mode():
        assert torch.allclose(apply(layer, x[None], 0)[0], x, atol=1e-5)


def test_generation_is_deterministic_for_a_seed(client: TestClient, live: LiveModel) -> None:
    body = {"text": PROMPT, "n_tokens": 8, "seed": 3, "temperature": 1.0}
    body["edits"] = [{"latent": 2, "layer": live.layers[-1], "factor": 20.0, "unit": "raw"}]
    first, second = (client.post("/api/v1/prompt/generate", json=body).json() for _ in range(2))
    assert first == second
    assert first["steered"] != first["default"]
    other = client.post("/api/v1/prompt/generate", json={**body, "seed": 4}).json()
    assert other["default"] != first["default"]
    greedy = client.post("/api/v1/prompt/generate", json={**body, "temperature": 0, "edits": []}).json()
    assert greedy["default"] == greedy["steered"]


def test_the_kv_cached_greedy_continuation_equals_a_full_recompute(live: LiveModel) -> None:
    run = live.run(PROMPT)
    got = ops.continue_ids(live, run.ids, None, set(), ops.Continuation(6, 0, 0.0))
    ids = run.ids.clone()
    with torch.inference_mode():
        for _ in range(6):
            ids = torch.cat([ids, live.model(input_ids=ids[None], use_cache=False).logits[0, -1].argmax()[None]])
    assert got == ids[len(run.ids) :].tolist()


def test_the_rerun_shortcut_equals_the_whole_model(live: LiveModel) -> None:
    assert live.rerun_ok
    run = live.run(PROMPT)
    with torch.inference_mode():
        for layer in live.layers:
            fast = live.rerun(run, layer, run.streams[layer] * 1.5)
            slow = live._hooked(run, layer, run.streams[layer] * 1.5, None)
            assert torch.allclose(fast, slow, atol=1e-4)


def test_limits_and_bad_requests(live_stores: LiveStores, live: LiveModel, client: TestClient) -> None:
    stores = ExplorerStores(live_stores.index, {}, None)
    small = TestClient(build_app(stores, None, LiveViews(_live(live_stores, max_prompt_tokens=4), stores.index)))
    assert small.post("/api/v1/prompt", json={"text": PROMPT}).status_code == 413
    assert "--max-prompt-tokens" in small.post("/api/v1/prompt", json={"text": PROMPT}).json()["detail"]
    bad = {
        "layer": ({"text": PROMPT, "layer": 99, "position": 1}, "/logits"),
        "position": ({"text": PROMPT, "layer": live.layers[0], "position": 999}, "/logits"),
        "latent": ({"text": PROMPT, "edits": [{"latent": 10**6, "layer": live.layers[0], "factor": 1}]}, "/steer"),
        "positions": (
            {"text": PROMPT, "edits": [{"latent": 1, "layer": live.layers[0], "factor": 1}], "positions": "x"},
            "/steer",
        ),
        "no edit": ({"text": PROMPT, "edits": []}, "/steer"),
    }
    for name, (body, route) in bad.items():
        response = client.post(f"/api/v1/prompt{route}", json=body)
        assert response.status_code == 422, name
        assert "\n" not in response.json()["detail"]
    assert client.get("/api/v1/meta").json()["live"] is True


def test_concurrent_requests_get_the_answers_of_sequential_ones(client: TestClient) -> None:
    texts = [f"{PROMPT} {word}" for word in ("alpha", "beta", "gamma", "delta")]
    alone = [client.post("/api/v1/prompt", json={"text": t}).json() for t in texts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda t: client.post("/api/v1/prompt", json={"text": t}).json(), texts * 2))
    assert together == alone * 2


def test_the_lens_an_sae_carries_is_applied_to_encoding_splicing_and_steering(
    live_stores: LiveStores, live: LiveModel
) -> None:
    n, d = len(live.layers), live.sae.cfg.d_model
    g = torch.Generator().manual_seed(0)
    A, b = 0.1 * torch.randn(n, d, d, generator=g), 0.1 * torch.randn(n, d, generator=g)
    lensed = load_live_model(
        str(live_stores.model), "cpu", live.sae, live.layers, read_meta(live_stores.cache), 256, Lens(live.layers, A, b)
    )
    run = lensed.run(PROMPT)
    translated = [run.streams[layer].float() @ (torch.eye(d) + A[i]).T + b[i] for i, layer in enumerate(live.layers)]
    for i in range(n):
        indices, _ = encode_rows(live.sae, translated[i].numpy())
        assert np.array_equal(np.sort(indices, -1), np.sort(run.indices[i], -1))
    i, layer, p = 1, live.layers[1], 4

    def splice(x: torch.Tensor) -> torch.Tensor:
        y_hat = live.sae(x.float() @ (torch.eye(d) + A[i]).T + b[i]).x_hat.detach()
        back = torch.linalg.solve(torch.eye(d) + A[i], (y_hat - b[i]).T).T
        return torch.where(torch.from_numpy(run.trainable)[:, None], back, x.float())

    _, logits = _streams(lensed, run.ids, {layer: _replacing(splice)})
    assert torch.allclose(ops.recon_logits(lensed, run, layer).logits, logits, atol=1e-4)
    views = LiveViews(lensed, ExplorerIndex(live_stores.index))
    apply = ops.edit_fn(
        lensed, [Edit(2, layer, 3.0, "add", "raw")], positions_fn(f"only:{p}", len(run.ids)), views.typical
    )
    with torch.inference_mode():
        change = apply(layer, run.streams[layer][None], 0)[0] - run.streams[layer]
    sigma = translated[i][p].std(correction=1)
    want = torch.linalg.solve(torch.eye(d) + A[i], 3.0 * sigma * live.sae.W_dec[2].detach())
    assert torch.allclose(change[p], want, atol=1e-4)
    assert float(change[:p].abs().max()) == 0.0


def test_steering_changes_in_log_probability_are_the_logit_changes_less_their_log_sum_exp_shift(
    live: LiveModel, live_stores: LiveStores
) -> None:
    views = LiveViews(live, ExplorerIndex(live_stores.index))
    run, layer = live.run(PROMPT), live.layers[1]
    edit = [Edit(1, layer, 5.0, "add", "raw")]
    apply = ops.edit_fn(live, edit, positions_fn("all", len(run.ids)), views.typical)
    with torch.inference_mode():
        steered = live.rerun(run, layer, apply(layer, run.streams[layer][None], 0)[0], apply)
        base = live.rerun(run, layer, run.streams[layer])
    want = torch.log_softmax(steered, -1) - torch.log_softmax(base, -1)
    got = ops.steer(live, run, edit, "all", views.typical, 3, logprob=True)
    for p in range(len(run.ids)):
        assert got.increases[p].values == pytest.approx(torch.topk(want[p], 3).values.tolist(), abs=1e-4)
    zero = ops.steer(live, run, [Edit(1, layer, 0.0)], "all", views.typical, 3, logprob=True)
    assert all(v == 0.0 for c in zero.increases + zero.decreases for v in c.values)


def test_the_delta_ce_route_gives_each_layers_splice(client: TestClient, live: LiveModel) -> None:
    got = client.post("/api/v1/prompt/delta_ce", json={"text": PROMPT}).json()
    assert got["layers"] == list(live.layers)
    run = live.run(PROMPT)
    want = [ops.recon_logits(live, run, layer).delta_ce for layer in live.layers]
    assert got["delta_ce"] == pytest.approx(want, abs=1e-7)
    inline = client.post("/api/v1/prompt", json={"text": PROMPT, "delta_ce": True}).json()["delta_ce"]
    assert inline == pytest.approx(want, abs=1e-7)


def test_the_prompt_payload_is_sparse_not_dense(client: TestClient, live: LiveModel) -> None:
    """(L, P, k) arrays, not the (L, P, n_latents) the paper's app sent (tens of MB for 20 tokens)."""
    response = client.post("/api/v1/prompt", json={"text": PROMPT})
    got = response.json()
    n_layers, n_tokens, k = len(live.layers), len(got["tokens"]), live.sae.cfg.k
    for name in ("indices", "values", "quantiles"):
        assert np.asarray(got[name], dtype=float).shape == (n_layers, n_tokens, k)
    assert len(response.content) < 3 * 12 * n_layers * n_tokens * k  # three arrays of numbers of <= 12 characters
    assert live.sae.cfg.n_latents > 12 * k  # so a dense payload could not pass the bound above
