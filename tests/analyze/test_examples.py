"""examples.py: the streaming top-N equals a dense brute force; selection, contexts and escaping."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from mlsae_analyze import example_pages as pages
from mlsae_analyze.examples import ExamplesConfig, find_examples, parse_latent_ids
from mlsae_analyze.latents import LatentChunk, Latents, LatentsMeta, LatentsWriter, create_latents
from mlsae_cache.core.errors import InputError, StoreError
from mlsae_cache.store import TokenRows

N_LAYERS, K, N_LATENTS, N_TOKENS, WINDOW = 3, 4, 30, 500, 25


def config(**kwargs: object) -> ExamplesConfig:
    return ExamplesConfig(latents=Path("latents"), out=Path("out"), **kwargs)  # type: ignore[arg-type]


def make_latents(root: Path, seed: int = 0, chunk_tokens: int = 37) -> tuple[xr.Dataset, Latents]:
    """Random latents in windows of 25 tokens; values on a coarse grid so that ties occur; latent 29 never fires.
    The Dataset, and the same rows written as a latents store in `root`."""
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.choice(N_LATENTS - 1, K, replace=False) for _ in range(N_TOKENS * N_LAYERS)]).reshape(
        N_TOKENS, N_LAYERS, K
    )
    values = np.round(rng.exponential(1.0, indices.shape), 1).astype(np.float32)
    values[rng.random(indices.shape) < 0.3] = 0
    indices = np.where(values > 0, indices, -1).astype(np.int32)  # inactive slots carry junk
    position = np.tile(np.arange(WINDOW), N_TOKENS // WINDOW)
    ds = xr.Dataset(
        {
            "indices": (("token", "layer", "k"), indices),
            "values": (("token", "layer", "k"), values),
            "trainable": (("token",), (position != 0) & (rng.random(N_TOKENS) > 0.1)),
            "sequence": (("token",), np.repeat(np.arange(N_TOKENS // WINDOW), WINDOW)),
            "position": (("token",), position.astype(np.int32)),
            "token_ids": (("token",), rng.integers(0, 50, N_TOKENS).astype(np.int32)),
        },
        coords={"layer": np.array([1, 4, 7], np.int32)},
    )
    meta = LatentsMeta(
        n_latents=N_LATENTS,
        k=K,
        layers=(1, 4, 7),
        sae_fingerprint="s",
        cache_fingerprint="c",
        sae_path="sae",
        cache_path="/nonexistent/cache",
        chunk_tokens=chunk_tokens,
        total_tokens=N_TOKENS,
    )
    return ds, write_latents(root / f"latents-{seed}-{chunk_tokens}", ds, meta)


def write_latents(path: Path, ds: xr.Dataset, meta: LatentsMeta) -> Latents:
    """The rows of `ds` committed chunk by chunk into a new latents store."""
    create_latents(path, meta)
    writer = LatentsWriter(path)
    for start in range(0, N_TOKENS, meta.chunk_tokens):
        rows = ds.isel(token=slice(start, start + meta.chunk_tokens))
        tokens = TokenRows(*(rows[name].values for name in TokenRows._fields))
        writer.commit(start, LatentChunk(start, rows["indices"].values, rows["values"].values, tokens))
    writer.set_meta(complete=True)
    return Latents(path)


def dense(ds: xr.Dataset, include_untrainable: bool) -> np.ndarray:
    """a[l, t, j] with dropped rows zeroed, shape [L, T, n]."""
    a = np.zeros((N_LAYERS, N_TOKENS, N_LATENTS))
    values, indices = ds["values"].values, ds["indices"].values
    t, layer, slot = np.nonzero(values > 0)
    np.add.at(a, (layer, t, indices[t, layer, slot]), values[t, layer, slot])
    if not include_untrainable:
        a[:, ~ds["trainable"].values] = 0
    return a


@pytest.mark.parametrize("include_untrainable", [False, True])
@pytest.mark.parametrize("chunk_tokens", [37, 500])
def test_top_examples_equal_a_dense_brute_force(tmp_path: Path, include_untrainable: bool, chunk_tokens: int) -> None:
    ds, latents = make_latents(tmp_path, chunk_tokens=chunk_tokens)
    cfg = config(latent_ids=tuple(range(N_LATENTS)), per_layer=6, include_untrainable=include_untrainable)
    found = find_examples(latents, cfg)
    a = dense(ds, include_untrainable)
    assert [s.latent for s in found] == list(range(N_LATENTS))
    for summary in found:
        j = summary.latent
        np.testing.assert_allclose(summary.totals, a[:, :, j].sum(1))
        for layer in range(N_LAYERS):
            order = np.lexsort((np.arange(N_TOKENS), -a[layer, :, j]))  # value down, then token order
            want = [(int(t), float(a[layer, t, j])) for t in order[:6] if a[layer, t, j] > 0]
            got = [(e.token, e.activation) for e in summary.examples if e.layer == layer]
            assert got == want, (j, layer)
            assert [e.rank for e in summary.examples if e.layer == layer] == list(range(len(want)))
    assert found[-1].examples == () and found[-1].mass == 0


def test_top_selects_the_latents_with_most_mass(tmp_path: Path) -> None:
    ds, latents = make_latents(tmp_path)
    found = find_examples(latents, config(top=5, per_layer=2))
    mass = dense(ds, False).sum((0, 1))
    assert [s.latent for s in found] == np.argsort(-mass, kind="stable")[:5].tolist()
    assert all(len([e for e in s.examples if e.layer == 0]) == 2 for s in found)


def test_contexts_stay_inside_the_window(tmp_path: Path) -> None:
    ds, latents = make_latents(tmp_path)
    found = find_examples(latents, config(top=8, per_layer=3, context=4))
    token_ids, sequence = ds["token_ids"].values, ds["sequence"].values
    for e in (e for s in found for e in s.examples):
        lo = e.token - e.focus
        assert 0 <= e.focus <= 4 and len(e.context) - e.focus - 1 <= 4
        assert list(e.context) == token_ids[lo : lo + len(e.context)].tolist()
        assert set(sequence[lo : lo + len(e.context)]) == {e.sequence}
        assert e.position == ds["position"].values[e.token]


def test_outputs_escape_text_and_fall_back_to_token_ids(tmp_path: Path) -> None:
    _ds, latents = make_latents(tmp_path)
    meta = latents.meta
    cfg = config(latent_ids=(0, 29), per_layer=2, context=2)
    found = find_examples(latents, cfg)
    (tmp_path / "out").mkdir()
    files, note = pages.write_examples(found, meta, cfg, tmp_path / "out")
    assert [f.name for f in files] == ["examples.md", "examples.tsv", "examples.html"]
    assert note and "token ids" in note.lower()
    md = (tmp_path / "out" / "examples.md").read_text()
    assert note in md and "never fires" in md and "[" in md
    tsv = (tmp_path / "out" / "examples.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == list(pages.TSV_COLUMNS)
    assert len(tsv) == 1 + len(found[0].examples) and all(
        len(line.split("\t")) == len(pages.TSV_COLUMNS) for line in tsv
    )
    # a tokenizer producing markup, pipes and line breaks
    nasty = {i: f"<b>|{i}\n" for i in range(50)}
    page = pages.render_html(found, meta, lambda i: nasty[i], "intro & <stuff>")
    assert "<b>" not in page and html.escape("<b>|") in page and "intro &amp; &lt;stuff&gt;" in page
    assert page.count("class='focus'") == len(found[0].examples)
    table = pages.render_markdown(found, meta, lambda i: nasty[i], "intro")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "⏎" in line]
    assert rows and all(line.count(" | ") == 3 for line in rows)  # pipes escaped, one line per example


def test_markdown_focus_keeps_spaces_outside_bold() -> None:
    assert pages._md_focus(" foo") == " **foo**"
    assert pages._md_focus(" ") == "**␣**"
    assert pages._md_focus("a*b") == "**a\\*b**"


@pytest.mark.parametrize(("text", "ok"), [("3,17", (3, 17)), ("5", (5,)), ("3,x", None), ("", None), ("3,3", None)])
def test_parse_latent_ids(text: str, ok: tuple[int, ...] | None) -> None:
    if ok is None:
        with pytest.raises(InputError):
            parse_latent_ids(text)
    else:
        assert parse_latent_ids(text) == ok


@pytest.mark.parametrize(
    "kwargs", [{"top": 0}, {"per_layer": 0}, {"context": -1}, {"latent_ids": ()}], ids=["top", "per", "ctx", "empty"]
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(InputError):
        config(**kwargs)


def test_bad_latent_ids_and_indices_are_refused(tmp_path: Path) -> None:
    ds, latents = make_latents(tmp_path)
    with pytest.raises(InputError, match="out of range"):
        find_examples(latents, config(latent_ids=(3, 30)))
    bad = ds.copy(deep=True)
    bad["indices"].values[5, 0, 0], bad["values"].values[5, 0, 0] = 99, 1.0
    with pytest.raises(StoreError, match="outside"):
        find_examples(write_latents(tmp_path / "bad", bad, latents.meta), config(top=3))
