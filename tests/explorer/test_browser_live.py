"""The live-model pages in a real browser (Playwright driving Debian's chromium): `/prompt`, the latent page's "Test
your own text" and the overview's prompt box, against `explore --model cache` over stores built on the tiny random
Llama (tests/explorer/live_stores.py), and against `explore` without a model. What the pages show is checked
against the API's own answers, fetched here with direct requests; every test fails on a console error, a page error
or a request outside the server's origin. Screenshots go where test_browser.py puts them.

Without chromium (or playwright) these tests skip, except where MLSAE_REQUIRE_BROWSER=1 (CI), where that fails.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from mlsae_analyze.prompt import prompt_tokens
from mlsae_cache.models import load_cache_tokenizer
from mlsae_cache.store import read_meta
from tests.explorer import test_browser
from tests.explorer.conftest import Server
from tests.explorer.live_stores import PROMPT, LiveStores, make_live_stores
from tests.explorer.test_browser import Watched, expect, save, url_says

chromium, shots = test_browser.chromium, test_browser.shots  # the browser and the screenshots' folder (fixtures)

TEXT = f"?text={PROMPT.replace(' ', '%20')}"


@pytest.fixture(scope="module")
def live_stores(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> LiveStores:
    return make_live_stores(tmp_path_factory.mktemp("browser-live"), tiny_models["llama"])


@pytest.fixture(scope="module")
def live_server(live_stores: LiveStores) -> Iterator[Server]:
    running = Server(live_stores.index, "--model", "cache", "--device", "cpu")
    yield running
    running.stop()


@pytest.fixture
def watched(chromium: Any, live_server: Server) -> Iterator[Watched]:
    w = Watched(chromium, live_server.url)
    yield w
    w.page.close()


def call(server: Server, route: str, body: dict[str, Any]) -> Any:
    """The API's answer to a POST, straight from the server."""
    request = urllib.request.Request(
        f"{server.url}/api/v1/{route}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def active_at(prompt: dict[str, Any], p: int) -> dict[int, list[float]]:
    """Latent -> its value per layer at token p, for the latents active there at some layer."""
    out: dict[int, list[float]] = {}
    for layer, (indices, values) in enumerate(zip(prompt["indices"], prompt["values"], strict=True)):
        for j, v in zip(indices[p], values[p], strict=True):
            if v > 0:
                out.setdefault(j, [0.0] * len(prompt["layers"]))[layer] = v
    return out


def shown(locator: Any) -> list[float]:
    """The numbers a list of elements shows (their text)."""
    return [float(t) for t in locator.all_inner_texts()]


def test_enter_runs_the_prompt_and_shows_every_token(watched: Watched, live_stores: LiveStores, shots: Path) -> None:
    page = watched.open("/prompt", "[data-testid=prompt-input]")
    box = page.locator("[data-testid=prompt-input]")
    box.click()
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")  # a new line, not a submission
    page.keyboard.type("second line")
    assert box.input_value() == "first line\nsecond line"
    assert page.locator("[data-testid=token]").count() == 0 and "text" not in watched.query()
    box.fill(PROMPT)
    box.press("Enter")
    url_says(page, text=PROMPT)
    tokens = page.locator("[data-testid=token]")
    tokenizer = load_cache_tokenizer({}, override=str(live_stores.model))
    ids, keep = prompt_tokens(PROMPT, tokenizer, read_meta(live_stores.cache))
    expect(tokens).to_have_count(len(ids))
    skipped = [tokens.nth(p).evaluate("e => e.classList.contains('skipped')") for p in range(len(ids))]
    assert skipped == [not k for k in keep] and skipped[0]  # the separator at position 0 is marked, not trained on
    expect(page.locator("[data-testid=delta-ce]").first).not_to_have_text("…")  # the second request has answered
    save(page, shots, "prompt")
    watched.check()


def test_clicking_a_token_selects_it_and_the_heatmap_rows_are_the_latents_there(
    watched: Watched, live_server: Server, shots: Path
) -> None:
    prompt = call(live_server, "prompt", {"text": PROMPT})
    page = watched.open("/prompt" + TEXT, "[data-testid=token]")
    for p in (3, 0):  # a text token, then the untrainable separator
        page.locator(f"[data-testid=token][data-position='{p}']").click()
        url_says(page, pos=str(p))
        expect(page.locator(f"[data-testid=token-preview][data-position='{p}']")).to_have_count(1)
        want = active_at(prompt, p)
        rows = page.locator("[data-testid=latent-layer-heatmap] [data-testid=heat-row]")
        expect(rows).to_have_count(len(want))
        got = {
            int(row.get_attribute("data-latent")): [
                float(v) for v in row.locator("rect").evaluate_all("cells => cells.map(c => c.dataset.value)")
            ]
            for row in rows.all()
        }
        assert got == want
        means = [float(row.get_attribute("data-mean")) for row in rows.all()]
        assert means == sorted(means)
    save(page, shots, "prompt-token-0")
    row = page.locator("[data-testid=heat-row]").nth(0)
    latent = row.get_attribute("data-latent")
    row.locator("rect").nth(1).click()
    url_says(page, latent=latent, layer="1", pos="0")
    expect(page.locator("[data-testid=token-layer-heatmap] [data-testid=selected-cell]")).to_have_attribute(
        "data-position", "0"
    )
    watched.check()


def test_hover_previews_a_token_without_changing_the_url(watched: Watched, live_server: Server) -> None:
    page = watched.open("/prompt" + TEXT + "&pos=2", "[data-testid=token]")
    before = page.url
    page.locator("[data-testid=token][data-position='5']").hover()
    preview = page.locator("[data-testid=token-preview]")
    expect(preview).to_have_attribute("data-position", "5")
    expect(preview).to_have_attribute("data-hover", "true")
    prompt = call(live_server, "prompt", {"text": PROMPT})
    latents = {
        int(x) for x in preview.locator("[data-testid=preview-row]").evaluate_all("r => r.map(x => x.dataset.latent)")
    }
    assert latents and latents <= set(active_at(prompt, 5))
    assert page.url == before
    page.mouse.move(5, 5)  # leaving the strip shows the selected token again
    expect(preview).to_have_attribute("data-position", "2")
    assert page.url == before
    page.keyboard.press("ArrowRight")
    url_says(page, pos="3")
    page.keyboard.press("ArrowDown")
    url_says(page, pos="3", layer="0")
    expect(page.locator("[data-testid=token].selected")).to_have_attribute("data-position", "3")
    page.locator("[data-testid=rank][data-value=quantile]").click()
    url_says(page, rank="quantile")
    expect(page.locator("[data-testid=rank][data-value=quantile]")).to_have_attribute("aria-pressed", "true")
    watched.check()


def test_the_recon_tab_at_layer_0_says_so_and_shows_the_apis_numbers(
    watched: Watched, live_server: Server, shots: Path
) -> None:
    page = watched.open("/prompt" + TEXT + "&tab=recon&layer=2&pos=4", "[data-testid=recon-heading]")
    expect(page.locator("[data-testid=recon-heading]")).to_contain_text("layer 2")
    page.locator("[data-testid=recon-layer]").select_option("0")
    url_says(page, layer="0", tab="recon", pos="4")
    heading = page.locator("[data-testid=recon-heading]")
    expect(heading).to_contain_text("layer 0")
    want = call(live_server, "prompt/logits", {"text": PROMPT, "layer": 0, "position": 4, "top": 10})
    assert want["layer"] == 0
    expect(page.locator("[data-testid=recon-delta-ce]")).to_have_text(f"{want['delta_ce']:.3f}")
    expect(page.locator("[data-testid=recon-kl]")).to_have_text(f"{want['kl']:.3f}")
    for kind in ("clean", "recon", "increases", "decreases"):
        values = page.locator(f"[data-testid=logit-list][data-kind={kind}] [data-testid=logit-value]")
        assert shown(values) == pytest.approx([t["value"] for t in want[kind]], abs=5e-4)
    save(page, shots, "prompt-recon-layer-0")
    watched.check()


def test_steering_by_zero_shows_every_change_as_zero(watched: Watched, live_server: Server, shots: Path) -> None:
    page = watched.open("/prompt" + TEXT + "&tab=steer&pos=3", "[data-testid=add-edit]")
    page.locator("[data-testid=add-edit]").click()
    factor = page.locator("[data-testid=edit-factor]")
    factor.fill("0")
    factor.press("Tab")
    latent = page.locator("[data-testid=edit-latent]").input_value()
    url_says(page, edit=f"{latent}:0:0:add:typical")
    page.locator("[data-testid=apply]").click()
    changes = page.locator("[data-testid=steer-change]")
    n_tokens = len(call(live_server, "prompt", {"text": PROMPT})["tokens"])
    expect(changes).to_have_count(n_tokens)
    values = page.locator("[data-testid=change-value]").all_inner_texts()
    assert len(values) >= n_tokens and set(values) == {"0.000"}  # a row where nothing moved names no token
    assert {row.get_attribute("data-still") for row in changes.all()} == {"true"}
    page.locator("[data-testid=gen-n]").fill("6")
    page.locator("[data-testid=gen-n]").press("Tab")
    page.locator("[data-testid=generate]").click()
    body = {"text": PROMPT, "n_tokens": 6, "seed": 0, "temperature": 1.0, "positions": "all"}
    body["edits"] = [{"latent": int(latent), "layer": 0, "factor": 0.0, "mode": "add", "unit": "typical"}]
    want = call(live_server, "prompt/generate", body)
    expect(page.locator("[data-testid=gen-default] b")).to_have_text(want["default"])
    expect(page.locator("[data-testid=gen-steered] b")).to_have_text(want["steered"])
    save(page, shots, "prompt-steer-zero")
    watched.check()


def test_a_steer_link_opens_with_its_edit_applied(watched: Watched, live_server: Server) -> None:
    page = watched.open(
        "/prompt" + TEXT + "&tab=steer&edit=3:1:2:add:raw&positions=only:4", "[data-testid=steer-change]"
    )
    edit = page.locator("[data-testid=edit]")
    assert edit.count() == 1 and edit.get_attribute("data-edit") == "3:1:2:add:raw"
    want = call(
        live_server,
        "prompt/steer",
        {
            "text": PROMPT,
            "edits": [{"latent": 3, "layer": 1, "factor": 2, "unit": "raw"}],
            "positions": "only:4",
            "measure": "logprob",
        },
    )
    for change in want["changes"]:
        row = page.locator(f"[data-testid=steer-change][data-position='{change['position']}']")
        values = [t["value"] for t in change["increases"] + change["decreases"]]
        still = all(v == 0 for v in values)
        assert row.get_attribute("data-still") == str(still).lower()
        assert shown(row.locator("[data-testid=change-value]")) == pytest.approx([0.0] if still else values, abs=5e-4)
    assert page.locator("[data-testid=steer-change][data-still=true]").count() == 4  # the tokens before the edit
    watched.check()


def test_the_latent_pages_own_text_shows_the_apis_values(watched: Watched, live_server: Server, shots: Path) -> None:
    prompt = call(live_server, "prompt", {"text": PROMPT})
    j = max(active_at(prompt, 3).items(), key=lambda item: max(item[1]))[0]
    page = watched.open(f"/latent/{j}?layer=1", "[data-testid=own-text-input]")
    page.locator("[data-testid=own-text-input]").fill(PROMPT)
    page.locator("[data-testid=own-text-input]").press("Enter")
    page.wait_for_selector("[data-testid=own-text-grid]")
    cells = page.locator("[data-testid=own-text-grid] rect[data-value]")
    got = cells.evaluate_all("cs => cs.map(c => [+c.dataset.layer, +c.dataset.position, +c.dataset.value])")
    layers, n = prompt["layers"], len(prompt["tokens"])
    none = [0.0] * len(layers)
    want = {(b, p): active_at(prompt, p).get(j, none)[layer] for layer, b in enumerate(layers) for p in range(n)}
    assert {(layer, p): v for layer, p, v in got} == want
    marks = page.locator("[data-testid=layer-histograms] [data-testid=hist-mark]")
    largest = {b: max(want[b, p] for p in range(n) if prompt["trainable"][p]) for b in layers}
    expect(marks).to_have_count(sum(1 for v in largest.values() if v > 0))
    got_marks = marks.evaluate_all("ms => ms.map(m => [+m.dataset.layer, +m.dataset.value])")
    assert dict(got_marks) == {b: v for b, v in largest.items() if v > 0}
    href = page.locator("[data-testid=steer-link]").get_attribute("href")
    query = parse_qs(urlparse(href).query)
    assert query["edit"] == [f"{j}:1:1:add:typical"] and query["text"] == [PROMPT]
    save(page, shots, "latent-own-text")
    page.locator("[data-testid=steer-link]").click()
    page.wait_for_selector("[data-testid=steer-change]")
    assert page.locator("[data-testid=edit]").get_attribute("data-edit") == f"{j}:1:1:add:typical"
    watched.check()


def test_the_overview_prompt_box_opens_the_prompt_page(watched: Watched) -> None:
    page = watched.open("/", "[data-testid=overview-prompt]")
    page.locator("[data-testid=overview-prompt]").fill(PROMPT)
    page.locator("[data-testid=overview-prompt]").press("Enter")
    page.wait_for_selector("[data-testid=token]")
    assert urlparse(page.url).path == "/prompt" and watched.query() == {"text": PROMPT}
    watched.check()


def test_without_a_model_the_pages_say_how_to_start_one_and_post_nothing(
    chromium: Any, live_stores: LiveStores, shots: Path
) -> None:
    running = Server(live_stores.index)
    try:
        w = Watched(chromium, running.url)
        posts: list[str] = []
        w.page.on("request", lambda r: posts.append(r.url) if r.method != "GET" else None)
        for name, path in (("prompt", "/prompt" + TEXT), ("latent", "/latent/1"), ("overview", "/")):
            page = w.open(path, "[data-testid=no-model]")
            expect(page.locator("[data-testid=no-model]")).to_contain_text("mlsae-analyze explore INDEX --model cache")
            save(page, shots, f"no-model-{name}")
        assert page.locator("[data-testid=overview-prompt]").count() == 0
        assert posts == []
        w.check()
    finally:
        running.stop()
