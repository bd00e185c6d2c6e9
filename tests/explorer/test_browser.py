"""The pages in a real browser (Playwright driving Debian's chromium) against `explore` running in a subprocess:
no console error, no page error, no request outside the server's origin on any page; the values drawn equal the
stores'; clicks and arrow keys move the selection and the URL says so. Screenshots of every page are saved under
the test's temporary directory (and copied to $MLSAE_EXPLORER_SHOTS when set), to be looked at.

Without chromium (or playwright) these tests skip, except where MLSAE_REQUIRE_BROWSER=1 (CI), where that fails.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the tests then skip (or fail where a browser is required), in the fixture
    expect = None

from mlsae_analyze.explorer.build import run_index
from mlsae_analyze.results import VarianceOutput
from mlsae_analyze.variance import VarianceConfig, run_variance
from mlsae_cache.models import load_cache_tokenizer
from tests.explorer.conftest import Server, index_config
from tests.explorer.stores import CONTEXT, PLANTED, PLANTED_LAYER, PLANTED_ROW, PLANTED_TOKEN, PLANTED_VALUE, Stores

LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOC, POS = PLANTED_ROW // CONTEXT, PLANTED_ROW % CONTEXT


def _unavailable(reason: str) -> None:
    if os.environ.get("MLSAE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests are required here (MLSAE_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        _unavailable("Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:  # left at the module's end: its event loop must not outlive these tests
        launched = pw.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


class Watched:
    """A page whose console errors, page errors and requests outside `origin` are recorded."""

    def __init__(self, browser: Any, origin: str) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.origin = origin
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("request", self._request)

    def _request(self, request: Any) -> None:
        url = request.url
        if not url.startswith((self.origin + "/", "data:")):
            self.outside.append(url)

    def open(self, path: str, ready: str) -> Any:
        self.page.goto(self.origin + path)
        self.page.wait_for_selector(ready)
        self.page.wait_for_load_state("networkidle")
        return self.page

    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlparse(self.page.url).query).items()}

    def check(self, allowed: tuple[str, ...] = ()) -> None:
        errors = [e for e in self.errors if not any(a in e for a in allowed)]
        assert errors == [] and self.outside == []


def url_says(page: Any, timeout_s: float = 10.0, **params: str | None) -> None:
    """Wait until the page's URL has these query parameters (None: absent). Polled from Python: the pages' content
    security policy forbids the string evaluation a browser-side wait would need."""
    deadline = time.monotonic() + timeout_s
    while True:
        query = {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}
        if all(query.get(k) == v for k, v in params.items()):
            return
        assert time.monotonic() < deadline, f"URL {page.url} never had {params}"
        page.wait_for_timeout(50)


def save(page: Any, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("MLSAE_EXPLORER_SHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)


@pytest.fixture
def watched(chromium: Any, server: Server) -> Iterator[Watched]:
    w = Watched(chromium, server.url)
    yield w
    w.page.close()


def visible(text: str) -> str:
    """A token as the pages show it (spaces as ·, line breaks as ⏎, tabs as ⇥)."""
    return text.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥").replace("\r", "")


PAGES = [
    ("overview", "/", "[data-testid=overview-heatmap]"),
    ("latents", "/latents", "[data-testid=latent-row]"),
    ("latent", f"/latent/{PLANTED}", "[data-testid=example]"),
    ("latent-quantile", f"/latent/{PLANTED}?layer={PLANTED_LAYER}&kind=quantile", "[data-testid=example]"),
    ("doc", f"/doc/{DOC}?latent={PLANTED}&pos={POS}&layer={PLANTED_LAYER}", "[data-testid=latent-layer-heatmap]"),
    ("api", "/docs", "[data-testid=api-route]"),
]


@pytest.mark.parametrize(("name", "path", "ready"), PAGES, ids=[p[0] for p in PAGES])
def test_every_page_loads_cleanly(watched: Watched, shots: Path, name: str, path: str, ready: str) -> None:
    page = watched.open(path, ready)
    save(page, shots, name)
    watched.check()
    assert page.locator("#banner").is_hidden()


def test_the_bars_carry_the_variance_output(watched: Watched, stores: Stores) -> None:
    page = watched.open(f"/latent/{PLANTED}", "[data-testid=layer-bar]")
    probs = VarianceOutput.read(stores.variance).probs[:, PLANTED]
    bars = page.locator("[data-testid=layer-bar]")
    got = [
        (int(bars.nth(i).get_attribute("data-layer")), float(bars.nth(i).get_attribute("data-p")))
        for i in range(bars.count())
    ]
    assert got == [(layer, float(p)) for layer, p in enumerate(probs)]
    watched.check()


def test_clicking_a_bar_selects_its_layer_and_the_url_says_so(watched: Watched) -> None:
    page = watched.open(f"/latent/{PLANTED}", "[data-testid=example]")
    page.locator(f"[data-testid=layer-bar][data-layer='{PLANTED_LAYER}']").click()
    url_says(page, layer=str(PLANTED_LAYER))
    tab = page.locator(f"[data-testid=layer-tab][data-layer='{PLANTED_LAYER}']")
    expect(tab).to_have_attribute("aria-pressed", "true")
    # the All tab's first example may already sit at the planted layer: wait until no example of another layer
    # is left, then check that the layer's examples are there
    others = page.locator(f"[data-testid=example]:not([data-layer='{PLANTED_LAYER}'])")
    expect(others).to_have_count(0)
    examples = page.locator("[data-testid=example]")
    expect(examples.first).to_have_attribute("data-layer", str(PLANTED_LAYER))
    assert {e.get_attribute("data-layer") for e in examples.all()} == {str(PLANTED_LAYER)}
    assert watched.query()["layer"] == str(PLANTED_LAYER)
    page.go_back()
    url_says(page, layer=None)
    expect(page.locator("[data-testid=layer-tab][data-layer=all]")).to_have_attribute("aria-pressed", "true")
    watched.check()


def test_the_first_top_example_is_the_planted_one(watched: Watched, llama: Path) -> None:
    page = watched.open(f"/latent/{PLANTED}", "[data-testid=example]")
    first = page.locator("[data-testid=example]").first
    assert float(first.get_attribute("data-act")) == PLANTED_VALUE and first.get_attribute("data-token") == str(
        PLANTED_ROW
    )
    token = load_cache_tokenizer({}, override=str(llama)).decode([PLANTED_TOKEN])
    assert first.locator(".tok.focus").inner_text() == visible(token)
    strip = first.locator("[data-testid=layer-strip] rect[data-value]")
    values = [float(strip.nth(i).get_attribute("data-value")) for i in range(strip.count())]
    assert int(np.argmax(values)) == PLANTED_LAYER and max(values) == PLANTED_VALUE
    watched.check()


def test_open_in_context_lands_on_the_cell(watched: Watched, shots: Path) -> None:
    page = watched.open(f"/latent/{PLANTED}", "[data-testid=example]")
    page.locator("[data-testid=example]").first.locator("[data-testid=open-in-context]").click()
    page.wait_for_selector("[data-testid=selected-cell]")
    assert urlparse(page.url).path == f"/doc/{DOC}"
    assert watched.query() == {"latent": str(PLANTED), "pos": str(POS), "layer": str(PLANTED_LAYER)}
    cell = page.locator("[data-testid=token-layer-heatmap] [data-testid=selected-cell]")
    assert (cell.get_attribute("data-position"), cell.get_attribute("data-layer")) == (str(POS), str(PLANTED_LAYER))
    assert page.locator(".tok.selected").get_attribute("data-position") == str(POS)
    rows = page.locator("[data-testid=latent-layer-heatmap]")
    assert rows.count() == 1
    save(page, shots, "doc-from-example")
    watched.check()


def test_arrow_keys_move_the_selection(watched: Watched) -> None:
    page = watched.open(f"/doc/{DOC}?latent={PLANTED}&pos={POS}&layer={PLANTED_LAYER}", "[data-testid=selected-cell]")
    page.keyboard.press("ArrowRight")
    url_says(page, pos=str(POS + 1))
    page.keyboard.press("ArrowDown")
    url_says(page, layer=str(PLANTED_LAYER + 1))
    page.wait_for_selector(f"[data-testid=token-layer-heatmap] [data-testid=selected-cell][data-position='{POS + 1}']")
    assert page.locator(".tok.selected").get_attribute("data-position") == str(POS + 1)
    page = watched.open(f"/latent/{PLANTED}", "[data-testid=example]")
    page.keyboard.press("ArrowRight")
    url_says(page, layer="0")
    page.keyboard.press("ArrowDown")
    page.wait_for_selector(".example.current[data-index='0']")
    watched.check()


def test_the_table_sorts_and_opens_a_latent(watched: Watched) -> None:
    page = watched.open("/latents", "[data-testid=latent-row]")
    page.locator("th", has_text="mean layer").click()
    url_says(page, sort="mean_layer")
    # the URL changes before the sorted table arrives: wait for the header that says how it is sorted
    expect(page.locator("th[aria-sort]", has_text="mean layer")).to_have_count(1)
    page.keyboard.press("ArrowDown")
    current = page.locator("[data-testid=latent-row].current")
    expect(current).to_have_count(1)
    first = current.get_attribute("data-latent")
    assert first == page.locator("[data-testid=latent-row]").first.get_attribute("data-latent")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/latent/{first}")
    watched.check()


def test_a_stale_index_shows_the_rebuild_command(chromium: Any, tmp_path: Path, stores: Stores, shots: Path) -> None:
    root = tmp_path / "stores"
    shutil.copytree(stores.root, root)
    copy = Stores(root, root / "cache", root / "sae", root / "latents", root / "variance", stores.planted)
    run_index(index_config(copy, tmp_path / "index", logits=False))
    run_variance(VarianceConfig(copy.latents, copy.variance, min_count=2, scheduler="sync", overwrite=True))
    running = Server(tmp_path / "index")
    try:
        assert any(line.startswith("warning: the index is out of date: variance") for line in running.lines)
        w = Watched(chromium, running.url)
        page = w.open("/latent/0", "[data-testid=rebuild]")
        assert page.locator("[data-testid=rebuild]").inner_text().startswith("mlsae-analyze index ")
        save(page, shots, "stale")
        w.check(allowed=("409",))
        assert w.errors  # the failed request is reported, and nothing else
    finally:
        running.stop()
