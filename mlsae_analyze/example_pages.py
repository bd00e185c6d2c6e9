"""Pages of max-activating examples: Markdown, TSV and a static HTML page, one section per latent with its profile
over layers and its examples grouped by layer, every context token shaded by the latent's activation there.

Token ids are decoded with the tokenizer of the cache's model (or `--model`); where none can be loaded, ids like
`[123]` are shown and the page says why.
"""

from __future__ import annotations

import functools
import html
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlsae_analyze.examples import DEFAULT_TOP, Example, ExamplesConfig, LatentSummary, find_examples
from mlsae_analyze.latents import Latents, LatentsMeta
from mlsae_analyze.layers import block_mean, layer_runs
from mlsae_cache.core.errors import MlsaeError
from mlsae_cache.core.outputs import check_replaceable, output_dir
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.models import load_cache_tokenizer
from mlsae_cache.store import read_meta

log = logging.getLogger(__name__)


Decoder = Callable[[int], str]


def load_decoder(meta: LatentsMeta, model: str | None = None) -> tuple[Decoder, str | None]:
    """Decode token ids with the tokenizer of `model`, else of the model of the store's cache; if that cannot be
    loaded, show ids like `[123]` and return a note saying why."""
    try:
        model_meta = {} if model else read_meta(meta.cache_path).model
        tokenizer = load_cache_tokenizer(model_meta, override=model)
    except (MlsaeError, OSError) as e:
        log.warning("showing token ids: %s", e)
        why = " ".join(str(e).split())
        note = (
            f"Token ids are shown instead of text: no tokenizer could be loaded ({why}); give the model with --model."
        )
        return (lambda i: f"[{i}]"), note
    return functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i])), None


def visible(text: str) -> str:
    """A token's text on one line: line breaks and tabs shown as ⏎ and ⇥."""
    return text.replace("\r", "").replace("\n", "⏎").replace("\t", "⇥")


def split_context(example: Example, decode: Decoder) -> tuple[str, str, str]:
    """(left text, the example's token, right text), each made visible."""
    words = [visible(decode(i)) for i in example.context]
    return "".join(words[: example.focus]), words[example.focus], "".join(words[example.focus + 1 :])


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#])")


def _md(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_focus(token: str) -> str:
    """The token in bold, whitespace kept outside the markers (Markdown ignores `** x**`)."""
    core = token.strip(" ")
    if not core:
        return f"**{'␣' * max(1, len(token))}**"
    lead, trail = token[: len(token) - len(token.lstrip(" "))], token[len(token.rstrip(" ")) :]
    return f"{lead}**{_md(core)}**{trail}"


def _heading(summary: LatentSummary, layers: tuple[int, ...]) -> str:
    """'Latent j: activation mass m, mean layer x, active at layers a-b'; the mean is interpolated between
    the block indices of neighbouring layer positions."""
    if summary.mass <= 0:
        return f"Latent {summary.latent}: never active"
    at = layer_runs([layers[i] for i in np.flatnonzero(summary.totals > 0)])
    mean = block_mean(summary.mean_layer, layers)
    mass = f"{summary.mass:,.0f}" if summary.mass >= 100 else f"{summary.mass:.3g}"
    return f"Latent {summary.latent}: activation mass {mass}, mean layer {mean:.2f}, active at layers {at}"


SPARK = "▁▂▃▄▅▆▇█"


def profile_line(summary: LatentSummary, layers: tuple[int, ...]) -> str:
    """The latent's share of activation at each layer as one line of bars, lowest to highest block."""
    share = summary.totals / summary.totals.max() if summary.mass > 0 else summary.totals
    bars = "".join(" " if v <= 0 else SPARK[min(int(v * len(SPARK)), len(SPARK) - 1)] for v in share)
    return f"layers {layers[0]}..{layers[-1]}: `{bars}`"


def render_markdown(summaries: tuple[LatentSummary, ...], meta: LatentsMeta, decode: Decoder, intro: str) -> str:
    """One section per latent: its profile over layers, then a table of its examples, the activating token in
    bold."""
    lines = ["# Max-activating examples", "", intro, ""]
    for summary in summaries:
        lines += [f"## {_heading(summary, meta.layers)}", ""]
        if not summary.examples:
            lines += ["No example: this latent never fires on the rows used.", ""]
            continue
        lines += [profile_line(summary, meta.layers), ""]
        lines += ["| layer | rank | activation | context |", "|---:|---:|---:|:---|"]
        for ex in summary.examples:
            left, token, right = split_context(ex, decode)
            context = f"{_md(left)}{_md_focus(token)}{_md(right)}"
            lines.append(f"| {meta.layers[ex.layer]} | {ex.rank + 1} | {ex.activation:.4g} | {context} |")
        lines.append("")
    return "\n".join(lines)


TSV_COLUMNS = tuple("latent layer rank activation row sequence position token_id token left right".split())  # noqa: SIM905


def render_tsv(summaries: tuple[LatentSummary, ...], meta: LatentsMeta, decode: Decoder) -> str:
    """One line per example (columns TSV_COLUMNS); text made visible, so no tab or newline inside a field."""
    lines = ["\t".join(TSV_COLUMNS)]
    for ex in (ex for s in summaries for ex in s.examples):
        left, token, right = split_context(ex, decode)
        fields = (
            ex.latent,
            meta.layers[ex.layer],
            ex.rank + 1,
            f"{ex.activation:.6g}",
            ex.token,
            ex.sequence,
            ex.position,
            ex.context[ex.focus],
            token,
            left,
            right,
        )
        lines.append("\t".join(str(f) for f in fields))
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}
h2{margin-top:2em;border-top:1px solid #ccc;padding-top:.6em}.profile{display:flex;align-items:flex-end;gap:2px;
height:60px;margin:.5em 0 .2em}.profile div{width:14px;background:#3b6ea8}.axis{display:flex;gap:2px;font-size:9px;
color:#666}.axis span{width:14px;text-align:center}table{border-collapse:collapse;margin:.4em 0 1em}td,th{padding:2px
8px;border-bottom:1px solid #eee;text-align:right;vertical-align:top}td.ctx{text-align:left;font-family:monospace;
white-space:pre-wrap}td.ctx span{border-radius:2px}td.ctx .focus{outline:2px solid #c0392b}h3{font-size:1em;
margin:.8em 0 .2em}"""


def _profile_html(summary: LatentSummary, layers: tuple[int, ...]) -> str:
    """Bars of the latent's share of activation per layer, each titled with the share, block indices below."""
    share = summary.totals / summary.totals.sum()
    top = share.max()
    bars = "".join(
        f"<div title='layer {b}: {v:.1%}' style='height:{max(v / top * 100, 1 if v > 0 else 0):.0f}%'></div>"
        for b, v in zip(layers, share, strict=True)
    )
    axis = "".join(f"<span>{b}</span>" for b in layers)
    return f"<div class='profile'>{bars}</div><div class='axis'>{axis}</div>"


def _context_html(example: Example, decode: Decoder, scale: float) -> str:
    """The context's tokens, each shaded by the latent's activation there (full colour at `scale`)."""
    values = example.context_values or (0.0,) * len(example.context)
    spans = []
    for i, (token, value) in enumerate(zip(example.context, values, strict=True)):
        alpha = min(value / scale, 1.0) if scale > 0 else 0.0
        focus = " class='focus'" if i == example.focus else ""
        style = f" style='background:rgba(230,126,34,{alpha:.2f})'" if alpha > 0 else ""
        text = html.escape(visible(decode(token)))
        spans.append(f"<span{focus}{style} title='{value:.4g}'>{text}</span>")
    return "".join(spans)


def _latent_html(summary: LatentSummary, layers: tuple[int, ...], decode: Decoder) -> list[str]:
    parts = [f"<h2 id='latent-{summary.latent}'>{html.escape(_heading(summary, layers))}</h2>"]
    if not summary.examples:
        return [*parts, "<p>No example: this latent never fires on the rows used.</p>"]
    parts.append(_profile_html(summary, layers))
    scale = max(ex.activation for ex in summary.examples)
    for position in sorted({ex.layer for ex in summary.examples}):
        parts.append(f"<h3>layer {layers[position]}</h3><table><tr><th>rank</th><th>activation</th><th>context</th>")
        for ex in (e for e in summary.examples if e.layer == position):
            ctx = _context_html(ex, decode, scale)
            parts.append(f"<tr><td>{ex.rank + 1}</td><td>{ex.activation:.4g}</td><td class='ctx'>{ctx}</td></tr>")
        parts.append("</table>")
    return parts


def render_html(summaries: tuple[LatentSummary, ...], meta: LatentsMeta, decode: Decoder, intro: str) -> str:
    """A static page: one section per latent with its profile over layers and its examples by layer, every context
    token shaded by the latent's activation there (hover a token for the value); all text escaped."""
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Max-activating examples</title>"
        f"<style>{_CSS}</style></head><body><h1>Max-activating examples</h1><p>{esc(intro)}</p>"
    ]
    for summary in summaries:
        parts += _latent_html(summary, meta.layers, decode)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def describe(meta: LatentsMeta, cfg: ExamplesConfig, note: str | None) -> str:
    """The sentence above the tables: what was searched and how to read it."""
    rows = "all rows" if cfg.include_untrainable else "trainable rows (position 0 and special tokens skipped)"
    if cfg.latent_ids is not None:
        which = "the latents asked for"
    elif cfg.random is not None:
        which = f"{cfg.random} latents drawn at random (seed {cfg.seed}) among those that fire"
    else:
        which = f"the {cfg.top or DEFAULT_TOP} latents with the most activation mass"
    if cfg.mean_layer is not None:
        which += f" whose mean layer lies in {cfg.mean_layer}"
    text = (
        f"{which[0].upper()}{which[1:]}: top {cfg.per_layer} activations per (latent, layer) over the {rows} of "
        f"{meta.n_tokens:,} tokens (SAE {meta.sae_path}: {meta.n_latents:,} latents, k={meta.k}); context: up to "
        f"{cfg.context} tokens either side in the same window, the activating token marked, every token shaded by "
        "the latent's activation there."
    )
    return f"{text} {note}" if note else text


def write_examples(
    summaries: tuple[LatentSummary, ...], meta: LatentsMeta, cfg: ExamplesConfig, out: Path
) -> tuple[list[Path], str | None]:
    """Write examples.md, examples.tsv and examples.html into the directory `out`; returns them and the
    decoding note (None when text was decoded)."""
    decode, note = load_decoder(meta, cfg.model)
    intro = describe(meta, cfg, note)
    files = {
        "examples.md": render_markdown(summaries, meta, decode, intro),
        "examples.tsv": render_tsv(summaries, meta, decode),
        "examples.html": render_html(summaries, meta, decode, intro),
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in files], note


@dataclass(frozen=True)
class ExamplesResult:
    """The latents shown with their examples, the files written, and why token ids stand in for text (if so)."""

    summaries: tuple[LatentSummary, ...]
    files: tuple[Path, ...]
    note: str | None


def run_examples(cfg: ExamplesConfig, progress: Progress = no_progress) -> ExamplesResult:
    """Find the examples of the latents store cfg.latents and write OUT/examples.{md,tsv,html}."""
    latents = Latents(cfg.latents)
    inputs = {"sae": latents.meta.sae_fingerprint, "cache": latents.meta.cache_fingerprint}
    check_replaceable(Path(cfg.out), "examples", inputs, cfg.overwrite)
    progress(0, total=2 * latents.n_tokens)
    found = find_examples(latents, cfg, progress)
    with output_dir(cfg.out, "examples", inputs, cfg.overwrite) as tmp:
        files, note = write_examples(found, latents.meta, cfg, tmp)
    return ExamplesResult(found, tuple(Path(cfg.out) / f.name for f in files), note)
