"""The JSON API through FastAPI's TestClient: schemas, planted values returned exactly, status codes (401, 404,
409, 413, 422, 503), payload sizes, and path-traversal attempts."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mlsae_analyze.explorer.build import run_index
from mlsae_analyze.explorer.serve import ExploreConfig, create_app
from mlsae_analyze.results import VarianceOutput
from mlsae_analyze.variance import VarianceConfig, run_variance
from mlsae_cache.models import load_cache_tokenizer
from tests.explorer.conftest import EVAL_DELTA_CE, EVAL_FVU, index_config
from tests.explorer.stores import (
    CONTEXT,
    N_LATENTS,
    N_LAYERS,
    N_TOKENS,
    PLANTED,
    PLANTED_LAYER,
    PLANTED_ROW,
    PLANTED_STRIP,
    PLANTED_TOKEN,
    PLANTED_VALUE,
    Stores,
    dense,
    make_stores,
)

PAYLOAD_LIMIT = 100_000


@pytest.fixture(scope="module")
def client(index: Path) -> TestClient:
    return TestClient(create_app(ExploreConfig(index)))


@pytest.fixture(scope="module")
def decode(llama: Path):  # noqa: ANN201
    tokenizer = load_cache_tokenizer({}, override=str(llama))
    return lambda i: tokenizer.decode([int(i)])


def get(client: TestClient, url: str, status: int = 200) -> dict:
    response = client.get(url)
    assert response.status_code == status, (url, response.text)
    return response.json()


def test_meta(client: TestClient, stores: Stores, llama: Path) -> None:
    meta = get(client, "/api/v1/meta")
    assert {k: meta[k] for k in ("n_latents", "k", "layers", "n_tokens", "live")} == {
        "n_latents": N_LATENTS,
        "k": 4,
        "layers": list(range(N_LAYERS)),
        "n_tokens": N_TOKENS,
        "live": False,
    }
    assert meta["model"] == str(llama) and meta["has_logits"] and meta["n_docs"] == N_TOKENS // CONTEXT
    assert meta["sources"]["latents"] == str(stores.latents.resolve())
    assert meta["eval"] == {"layer": list(range(N_LAYERS)), "fvu": EVAL_FVU, "delta_ce": EVAL_DELTA_CE}


def test_latent_returns_the_variance_output_and_planted_values(client: TestClient, stores: Stores) -> None:
    probs = VarianceOutput.read(stores.variance).probs
    a = dense(stores.planted)
    for j in (0, PLANTED, N_LATENTS - 1):
        got = get(client, f"/api/v1/latent/{j}")
        want = [None if np.isnan(p) else float(p) for p in probs[:, j]]
        assert got["latent"] == j and got["layer_probs"] == want
        assert got["counts"] == (a[:, :, j] > 0).sum(1).tolist()
        assert got["max"] == pytest.approx(a[:, :, j].max(1).tolist())
        assert len(got["histogram"]["layers"]) == N_LAYERS and len(got["quantile_edges"]) == N_LAYERS + 1
    got = get(client, f"/api/v1/latent/{PLANTED}")
    assert got["max_all"] == PLANTED_VALUE and got["mean_layer"] == pytest.approx(1.95, abs=0.1)
    assert len(got["logits_pos"]) == 10 and {"token", "value"} == set(got["logits_pos"][0])
    assert len(got["similar"]) == 10 and {"latent", "cosine"} == set(got["similar"][0])
    assert get(client, f"/api/v1/latent/{N_LATENTS - 1}")["mean_layer"] is None


@pytest.mark.parametrize(
    ("url", "status"),
    [
        (f"/api/v1/latent/{N_LATENTS}", 404),
        ("/api/v1/latent/-1", 404),
        ("/api/v1/latent/abc", 422),
        (f"/api/v1/latent/{N_LATENTS}/examples", 404),
        ("/api/v1/latent/1/examples?layer=9", 422),
        ("/api/v1/latent/1/examples?kind=best", 422),
        ("/api/v1/latent/1/examples?limit=101", 422),
        ("/api/v1/latent/1/examples?offset=-1", 422),
        ("/api/v1/doc/10", 404),
        ("/api/v1/doc/0?position=64", 422),
        (f"/api/v1/doc/0?latent={N_LATENTS}", 404),
        ("/api/v1/latents?sort=secret", 422),
        ("/api/v1/nothing", 404),
        (f"/latent/{N_LATENTS}", 404),
        ("/doc/99", 404),
    ],
)
def test_status_codes(client: TestClient, url: str, status: int) -> None:
    assert client.get(url).status_code == status


@pytest.mark.parametrize(
    "url",
    [
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/latent/..%2f..%2fetc%2fpasswd",
        "/doc/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/api/v1/latent/..%2f..%2fetc%2fpasswd",
        "/api/v1/latent/1/examples?layer=..%2f..%2fetc%2fpasswd",
        "/api/v1/doc/..%2fzarr.json",
        "/api/v1/latents?sort=..%2f..%2fetc",
    ],
)
def test_path_traversal_is_refused(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert response.status_code in (404, 422), url
    assert "root:" not in response.text and '"zarr_format"' not in response.text


def test_examples_carry_the_planted_token_and_window(client: TestClient, stores: Stores, decode) -> None:  # noqa: ANN001
    a = dense(stores.planted)
    for layer in ("all", str(PLANTED_LAYER)):
        got = get(client, f"/api/v1/latent/{PLANTED}/examples?layer={layer}&kind=top&limit=20")
        first = got["examples"][0]
        assert (first["token"], first["layer"], first["value"]) == (PLANTED_ROW, PLANTED_LAYER, PLANTED_VALUE)
        assert first["layer_strip"] == list(PLANTED_STRIP)
        assert first["tokens"][first["focus"]] == decode(PLANTED_TOKEN)
        assert first["sequence"] == PLANTED_ROW // CONTEXT and first["position"] == PLANTED_ROW % CONTEXT
    for ex in got["examples"]:
        lo = ex["token"] - ex["focus"]
        rows = np.arange(lo, lo + len(ex["tokens"]))
        assert set(rows // CONTEXT) == {ex["sequence"]} and ex["focus"] <= 8 and len(rows) - ex["focus"] <= 9
        assert ex["values"] == pytest.approx(a[PLANTED_LAYER, rows, PLANTED].tolist())
        assert ex["layer_strip"] == pytest.approx(a[:, ex["token"], PLANTED].tolist())
        assert ex["tokens"] == [decode(i) for i in stores.planted.tokens.token_ids[rows]]
        assert ex["skipped"] == np.flatnonzero(rows % CONTEXT == 0).tolist()
    values = [ex["value"] for ex in got["examples"]]
    assert values == sorted(values, reverse=True) and got["total"] == min(20, (a[PLANTED_LAYER, :, PLANTED] > 0).sum())


def test_quantile_and_random_examples(client: TestClient, stores: Stores) -> None:
    a = dense(stores.planted)
    got = get(client, f"/api/v1/latent/{PLANTED}/examples?layer={PLANTED_LAYER}&kind=quantile&limit=100")
    edges = got["group_edges"]
    assert len(edges) == 6 and edges[0] == 0 and edges[-1] == PLANTED_VALUE
    groups = [ex["group"] for ex in got["examples"]]
    assert groups == sorted(groups, reverse=True) and len(got["examples"]) == got["total"]
    for ex in got["examples"]:
        assert edges[ex["group"]] < ex["value"] <= edges[ex["group"] + 1]
    got = get(client, f"/api/v1/latent/{PLANTED}/examples?layer=all&kind=random&limit=100")
    fired = set(np.flatnonzero(a[:, :, PLANTED].max(0) > 0).tolist())
    tokens = [ex["token"] for ex in got["examples"]]
    assert len(set(tokens)) == len(tokens) == min(20, len(fired)) and set(tokens) <= fired
    page = get(client, f"/api/v1/latent/{PLANTED}/examples?layer=all&kind=random&offset=5&limit=3")
    assert [ex["token"] for ex in page["examples"]] == tokens[5:8] and page["offset"] == 5


def test_payloads_are_small(client: TestClient) -> None:
    for kind in ("top", "quantile", "random"):
        response = client.get(f"/api/v1/latent/{PLANTED}/examples?kind={kind}&limit=20")
        assert response.status_code == 200 and len(response.content) < PAYLOAD_LIMIT
    assert len(client.get(f"/api/v1/latent/{PLANTED}").content) < PAYLOAD_LIMIT
    assert len(client.get("/api/v1/doc/3?latent=7&position=8").content) < PAYLOAD_LIMIT


def test_latents_table_sorts_and_filters(client: TestClient, stores: Stores) -> None:
    a = dense(stores.planted)
    density = (a.max(0) > 0).sum(0) / stores.planted.tokens.trainable.sum()
    got = get(client, "/api/v1/latents?sort=density&limit=500")
    assert got["total"] == N_LATENTS
    assert [r["latent"] for r in got["rows"]] == np.lexsort((np.arange(N_LATENTS), -density)).tolist()
    assert [r["density"] for r in got["rows"]] == pytest.approx(np.sort(density)[::-1].tolist())
    got = get(client, "/api/v1/latents?sort=latent&desc=false&min_density=0.2&limit=5&offset=1")
    want = np.flatnonzero(density >= 0.2)
    assert got["total"] == len(want) and [r["latent"] for r in got["rows"]] == want[1:6].tolist()
    got = get(client, "/api/v1/latents?sort=mean_layer&desc=false&min_layer=1.5&max_layer=2")
    assert all(1.5 <= r["mean_layer"] <= 2 for r in got["rows"]) and got["rows"]
    top = get(client, "/api/v1/latents?sort=latent&desc=false&limit=1")["rows"][0]["top_logit"]
    found = client.get("/api/v1/latents", params={"q": top, "limit": 500}).json()["rows"]
    assert top and any(r["latent"] == 0 for r in found) and all(top.lower() in r["top_logit"].lower() for r in found)


def test_overview_orders_the_latents_by_mean_layer(client: TestClient, stores: Stores) -> None:
    got = get(client, "/api/v1/overview?width=5")
    assert got["layers"] == list(range(N_LAYERS)) and got["columns"] * got["per_column"] >= N_LATENTS - 1
    cells = np.frombuffer(base64.b64decode(got["cells"]), np.uint8).reshape(N_LAYERS, got["columns"])
    assert cells.max() == 255 and got["mean_layer"] == sorted(got["mean_layer"])
    assert N_LATENTS - 1 not in got["latent"]
    one = get(client, "/api/v1/overview?width=100")
    assert one["per_column"] == 1 and one["columns"] == N_LATENTS - 1


def test_doc_shows_the_latent_and_the_latents_at_a_token(client: TestClient, stores: Stores) -> None:
    a = dense(stores.planted)
    d, p = PLANTED_ROW // CONTEXT, PLANTED_ROW % CONTEXT
    got = get(client, f"/api/v1/doc/{d}?latent={PLANTED}&position={p}")
    rows = np.arange(d * CONTEXT, (d + 1) * CONTEXT)
    assert got["start"] == rows[0] and got["positions"] == list(range(CONTEXT)) and got["skipped"] == [0]
    cells = {(c["position"], c["layer"]): c["value"] for c in got["cells"]}
    layer, t = np.nonzero(a[:, rows, PLANTED])
    want = {(int(p), int(b)): float(a[b, rows[p], PLANTED]) for b, p in zip(layer, t, strict=True)}
    assert cells == want and got["latent_max"] == PLANTED_VALUE
    at = {x["latent"]: x["values"] for x in got["token_latents"]}
    active = np.flatnonzero(a[:, PLANTED_ROW].max(0) > 0)
    assert sorted(at) == active.tolist() and at[PLANTED] == list(PLANTED_STRIP)
    means = [x["mean_layer"] for x in got["token_latents"]]
    assert means == sorted(means)


@pytest.mark.parametrize(
    ("route", "body", "status"),
    [
        ("", {"text": "hello"}, 503),
        ("/logits", {"text": "hello", "layer": 0, "position": 0}, 503),
        ("/steer", {"text": "hi", "edits": [{"latent": 1, "layer": 0, "factor": 1.0}]}, 503),
        ("/generate", {"text": "hi"}, 503),
        ("", {"text": "x" * 4001}, 413),
        ("/steer", {"text": "hi", "edits": [{"latent": 1, "layer": 0, "factor": 1.0}] * 17}, 413),
        ("", {"text": "x" * 70_000}, 413),
        ("", {"words": "hi"}, 422),
    ],
    ids=["prompt", "logits", "steer", "generate", "long-text", "many-edits", "big-body", "bad-body"],
)
def test_live_routes_need_a_model(client: TestClient, route: str, body: dict, status: int) -> None:
    response = client.post(f"/api/v1/prompt{route}", json=body)
    assert response.status_code == status, response.text
    if status == 503:
        assert "live model" in response.json()["detail"]


def test_a_moved_store_gives_409_with_the_rebuild_command(tmp_path: Path, stores: Stores) -> None:
    root = tmp_path / "stores"
    shutil.copytree(stores.root, root)
    copy = Stores(root, root / "cache", root / "sae", root / "latents", root / "variance", stores.planted)
    run_index(index_config(copy, tmp_path / "index", logits=False))
    client = TestClient(create_app(ExploreConfig(tmp_path / "index")))
    assert client.get("/api/v1/meta").status_code == 200
    run_variance(VarianceConfig(copy.latents, copy.variance, min_count=2, scheduler="sync", overwrite=True))
    for url in ("/api/v1/meta", "/api/v1/latent/0", "/api/v1/latent/0/examples", "/api/v1/doc/0"):
        response = client.get(url)
        assert response.status_code == 409, url
        assert "variance" in response.json()["detail"] and "changed" in response.json()["detail"]
        assert (
            response.json()["rebuild"].startswith("mlsae-analyze index ")
            and "--overwrite" in response.json()["rebuild"]
        )
    assert client.get("/latent/0").status_code == 200  # the page loads, and shows the command
    shutil.rmtree(copy.sae)
    assert "is missing" in client.get("/api/v1/meta").json()["detail"]


def test_a_token_is_required_where_one_is_set(index: Path) -> None:
    client = TestClient(create_app(ExploreConfig(index, token="s3cret-token")))
    assert client.get("/api/v1/meta").status_code == 401 and client.get("/").status_code == 401
    assert client.get("/api/v1/meta?token=wrong-token").status_code == 401
    assert client.get("/api/v1/meta", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    first = client.get("/?token=s3cret-token")
    assert first.status_code == 200 and "httponly" in first.headers["set-cookie"].lower()
    assert client.get("/api/v1/meta").status_code == 200  # the cookie


def test_pages_openapi_and_headers(client: TestClient) -> None:
    for url in ("/", "/latents", f"/latent/{PLANTED}", "/doc/3", "/docs"):
        response = client.get(url)
        assert response.status_code == 200 and '<base href="/">' in response.text, url
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert "http" not in response.text.replace("http-equiv", "")  # no absolute URL, so nothing external
    spec = get(client, "/openapi.json")
    names = set(spec["components"]["schemas"])
    assert {"Meta", "Latent", "Example", "Examples", "LatentTable", "Overview", "Doc", "Problem"} <= names
    example = spec["components"]["schemas"]["Example"]["properties"]
    assert {"token", "sequence", "position", "layer", "value", "tokens", "values", "layer_strip"} <= set(example)
    assert "/api/v1/latent/{j}/examples" in spec["paths"] and "/api/v1/prompt/steer" in spec["paths"]
    assert client.get("/static/main.js").headers["content-type"].startswith("text/javascript")


def test_a_root_path_moves_every_link(index: Path) -> None:
    client = TestClient(create_app(ExploreConfig(index, root_path="/explorer")), root_path="/explorer")
    assert '<base href="/explorer/">' in client.get("/latents").text


def test_explore_config_refusals() -> None:
    with pytest.raises(ValueError, match="--token"):
        ExploreConfig(Path("i"), host="0.0.0.0")
    with pytest.raises(ValueError, match="at least 8"):
        ExploreConfig(Path("i"), token="short")
    with pytest.raises(ValueError, match="--root-path"):
        ExploreConfig(Path("i"), root_path="explorer/")
    with pytest.raises(ValueError, match="--port"):
        ExploreConfig(Path("i"), port=70000)
    assert ExploreConfig(Path("i"), host="0.0.0.0", token="a-long-secret").host == "0.0.0.0"
    assert ExploreConfig(Path("i"), host="::1").token is None


def test_other_stores_can_be_named_and_a_missing_index_is_one_error(
    tmp_path: Path, index: Path, stores: Stores
) -> None:
    moved = tmp_path / "latents"
    shutil.copytree(stores.latents, moved)
    client = TestClient(create_app(ExploreConfig(index, latents=moved)))
    assert get(client, "/api/v1/meta")["sources"]["latents"] == str(moved)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_app(ExploreConfig(tmp_path / "nothing"))
    other = make_stores(tmp_path / "other", seed=1)
    client = TestClient(create_app(ExploreConfig(index, variance=other.variance)))
    assert client.get("/api/v1/meta").status_code == 409


def test_a_version_1_latents_store_serves_the_same_examples(tmp_path: Path, index: Path, stores: Stores) -> None:
    from dataclasses import replace

    from mlsae_analyze.latents import Latents
    from tests.explorer.stores import write_latents

    meta = replace(Latents(stores.latents).meta, version=1, n_tokens=0, complete=False)
    v1 = write_latents(tmp_path / "latents", stores.planted, meta)
    assert v1.meta.version == 1
    new, old = (
        TestClient(create_app(ExploreConfig(index))),
        TestClient(create_app(ExploreConfig(index, latents=v1.path))),
    )
    for url in (
        f"/api/v1/latent/{PLANTED}/examples?layer=all&kind=top&limit=20",
        f"/api/v1/latent/{PLANTED}/examples?layer={PLANTED_LAYER}&kind=random&limit=20",
        f"/api/v1/doc/{PLANTED_ROW // CONTEXT}?latent={PLANTED}&position={PLANTED_ROW % CONTEXT}",
    ):
        assert get(new, url) == get(old, url)
