"""Max-activating examples: for each selected latent and layer, the tokens where it fires hardest (METHOD.md 6).

Two streaming passes over the latents store, one token chunk at a time, never holding anything of size
tokens x n_latents: pass 1 sums each latent's activation per layer (`totals` [L, n_latents], to pick the
latents with the most activation mass and to describe them); pass 2 keeps, for the selected latents only, a
running top-N per (layer, latent) (`TopN`). Rows with `trainable == False` are skipped unless asked.
Ties are broken by token order (the earlier token ranks first). Contexts are the `context` tokens either
side of the example that lie in the same window (equal `sequence`), decoded with the tokenizer of the cache's
model when it can be loaded (token ids otherwise, saying so), and written as Markdown, TSV and a static HTML page.
"""

from __future__ import annotations

import functools
import html
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlsae_analyze.latents import Latents, LatentsMeta
from mlsae_analyze.layers import block_mean, layer_distribution, layer_totals
from mlsae_analyze.outputs import output_dir
from mlsae_cache.core.errors import InputError, MlsaeError, StoreError
from mlsae_cache.models import load_cache_tokenizer
from mlsae_cache.store import TokenRows, read_meta

log = logging.getLogger(__name__)

EMPTY_TOKEN = -1


@dataclass(frozen=True)
class ExamplesConfig:
    """Everything `mlsae-analyze examples` takes; CLI options map one-to-one onto these fields.

    Which latents: `latent_ids`, else the `top` with most activation mass; `per_layer` examples per
    (latent, layer), `context` tokens either side.
    """

    latents: Path
    out: Path
    top: int = 10
    latent_ids: tuple[int, ...] | None = None
    per_layer: int = 5
    context: int = 4
    include_untrainable: bool = False

    def __post_init__(self) -> None:
        for name, low in (("top", 1), ("per_layer", 1), ("context", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag} must be an integer >= {low}, got {value!r}")
        if self.latent_ids is not None and not self.latent_ids:
            raise InputError("--latents is empty (give latent ids like 3,17)")


@dataclass(frozen=True)
class Example:
    """One example: `latent` fires with `activation` at layer position `layer` on store row `token`.

    context: token ids of the window around it, `focus` the example's index in it.
    """

    latent: int
    layer: int
    rank: int
    activation: float
    token: int
    sequence: int
    position: int
    context: tuple[int, ...]
    focus: int


@dataclass(frozen=True)
class LatentSummary:
    """A selected latent: its activation mass per layer position [L] and its examples."""

    latent: int
    totals: np.ndarray
    examples: tuple[Example, ...]

    @property
    def mass(self) -> float:
        return float(self.totals.sum())

    @property
    def mean_layer(self) -> float:
        """E[L|j] in layer positions (NaN if the latent never fires)."""
        return float(layer_distribution(self.totals[:, None]).mean[0])


class TopN:
    """Running top-n activations of m tracked latents at L layers: values [L, m, n] (descending, -inf = empty)
    and tokens [L, m, n] (store row, EMPTY_TOKEN = empty)."""

    def __init__(self, n_layers: int, n_tracked: int, n: int) -> None:
        self.n = n
        self.values = np.full((n_layers, n_tracked, n), -np.inf)
        self.tokens = np.full((n_layers, n_tracked, n), EMPTY_TOKEN, dtype=np.int64)

    def update(self, layer: int, slot: np.ndarray, value: np.ndarray, token: np.ndarray) -> None:
        """Offer entries (tracked slot, activation, store row), each [E], at layer position `layer`."""
        better = value > self.values[layer, slot, -1]  # only these can enter a full top-n
        slot, value, token = slot[better], value[better], token[better]
        if not len(slot):
            return
        touched = np.unique(slot)
        all_slot = np.concatenate([np.repeat(touched, self.n), slot])
        all_value = np.concatenate([self.values[layer, touched].ravel(), value])
        all_token = np.concatenate([self.tokens[layer, touched].ravel(), token])
        order = np.lexsort((all_token, -all_value, all_slot))  # by slot, then value down, then token
        group_start = np.searchsorted(all_slot[order], touched)
        take = order[(group_start[:, None] + np.arange(self.n)).ravel()]  # each group holds >= n entries
        self.values[layer, touched] = all_value[take].reshape(len(touched), self.n)
        self.tokens[layer, touched] = all_token[take].reshape(len(touched), self.n)


Progress = Callable[[int], None]


def _no_progress(n: int) -> None:
    pass


def _check_chunk(indices: np.ndarray, values: np.ndarray, n_latents: int) -> None:
    """Refuse values that are not finite and >= 0, and active slots naming a latent outside [0, n_latents)."""
    if not np.isfinite(values).all() or (values < 0).any():
        raise StoreError("latents `values` hold negative or non-finite activations (re-encode the store)")
    active = indices[values > 0]
    if active.size and (active.min() < 0 or active.max() >= n_latents):
        bad = int(active.min()) if active.min() < 0 else int(active.max())
        raise StoreError(
            f"latents `indices` hold latent {bad} at an active slot, outside [0, {n_latents}) (re-encode the store)"
        )


def _chunks(
    latents: Latents, include_untrainable: bool, progress: Progress
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, indices [C, L, k], values [C, L, k] float64) per token chunk; dropped rows get value 0 and
    inactive slots index 0."""
    for chunk in latents.chunks(progress):
        values = chunk.values.astype(np.float64)
        _check_chunk(chunk.indices, values, latents.n_latents)
        if not include_untrainable:
            values = values * chunk.tokens.trainable[:, None, None]
        yield chunk.start, np.where(values > 0, chunk.indices, 0), values


def latent_totals(latents: Latents, include_untrainable: bool = False, progress: Progress = _no_progress) -> np.ndarray:
    """Pass 1: totals[l, j] = sum_t a[l, t, j] over kept rows, shape [L, n_latents] float64."""
    totals = np.zeros((len(latents.layers), latents.n_latents))
    for _, indices, values in _chunks(latents, include_untrainable, progress):
        totals += layer_totals(indices, values, latents.n_latents)[0]
    return totals


def parse_latent_ids(text: str) -> tuple[int, ...]:
    """'3,17' -> (3, 17); InputError for anything else."""
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--latents {text!r} is not a comma-separated list of latent ids (like 3,17)") from None
    if len(set(ids)) != len(ids):
        raise InputError(f"--latents {text!r} names a latent twice (list each once)")
    return ids


def select_latents(totals: np.ndarray, cfg: ExamplesConfig) -> np.ndarray:
    """The latent ids to show: cfg.latents as given, else the cfg.top with most mass (active ones only)."""
    n_latents = totals.shape[1]
    if cfg.latent_ids is not None:
        bad = [j for j in cfg.latent_ids if not 0 <= j < n_latents]
        if bad:
            raise InputError(f"--latents {bad} out of range: this SAE has latents 0..{n_latents - 1}")
        return np.asarray(cfg.latent_ids, dtype=np.int64)
    mass = totals.sum(axis=0)
    order = np.argsort(-mass, kind="stable")[: cfg.top]
    return order[mass[order] > 0]


def top_activations(
    latents: Latents, selected: np.ndarray, cfg: ExamplesConfig, progress: Progress = _no_progress
) -> TopN:
    """Pass 2: the top cfg.per_layer rows of each (layer, selected latent); slot i is latent selected[i]."""
    slot_of = np.full(latents.n_latents, -1, dtype=np.int64)
    slot_of[selected] = np.arange(len(selected))
    top = TopN(len(latents.layers), len(selected), cfg.per_layer)
    k = latents.meta.k
    for start, indices, values in _chunks(latents, cfg.include_untrainable, progress):
        row = start + np.repeat(np.arange(indices.shape[0]), k)
        for layer in range(indices.shape[1]):
            slot, value = slot_of[indices[:, layer].ravel()], values[:, layer].ravel()
            hit = (slot >= 0) & (value > 0)
            top.update(layer, slot[hit], value[hit], row[hit])
    return top


def _context(row: int, sequence: np.ndarray, token_ids: np.ndarray, width: int) -> tuple[tuple[int, ...], int]:
    """Token ids within `width` of `row` in the same window, and the row's index in them."""
    lo, hi = max(0, row - width), min(len(sequence), row + width + 1)
    same = np.flatnonzero(sequence[lo:hi] == sequence[row]) + lo  # windows are contiguous runs
    return tuple(int(t) for t in token_ids[same]), int(row - same[0])


def _latent_examples(top: TopN, slot: int, latent: int, tokens: TokenRows, width: int) -> list[Example]:
    """The filled top-n entries of one tracked latent at every layer, as Examples with their contexts."""
    sequence, token_ids, position = tokens.sequence, tokens.token_ids, tokens.position
    examples = []
    for layer in range(top.tokens.shape[0]):
        rows, values = top.tokens[layer, slot], top.values[layer, slot]
        for rank in np.flatnonzero(rows != EMPTY_TOKEN):
            row = int(rows[rank])
            context, focus = _context(row, sequence, token_ids, width)
            examples.append(
                Example(
                    latent=latent,
                    layer=layer,
                    rank=int(rank),
                    activation=float(values[rank]),
                    token=row,
                    sequence=int(sequence[row]),
                    position=int(position[row]),
                    context=context,
                    focus=focus,
                )
            )
    return examples


def find_examples(
    latents: Latents, cfg: ExamplesConfig, progress: Progress = _no_progress
) -> tuple[LatentSummary, ...]:
    """The selected latents with their top examples per layer (definitions: module docstring).

    The token arrays are read whole (a few bytes per token). `progress` is called with the tokens of each chunk
    read, twice over the store (2 * n_tokens in all).
    """
    totals = latent_totals(latents, cfg.include_untrainable, progress)
    selected = select_latents(totals, cfg)
    top = top_activations(latents, selected, cfg, progress)
    tokens = latents.tokens()
    return tuple(
        LatentSummary(int(j), totals[:, j].copy(), tuple(_latent_examples(top, slot, int(j), tokens, cfg.context)))
        for slot, j in enumerate(selected)
    )


Decoder = Callable[[int], str]


def load_decoder(meta: LatentsMeta) -> tuple[Decoder, str | None]:
    """Decode token ids with the tokenizer of the model of the store's cache; if that cannot be loaded, show
    ids like `[123]` and return a note saying why."""
    try:
        tokenizer = load_cache_tokenizer(read_meta(meta.cache_path).model)
    except (MlsaeError, OSError) as e:
        log.warning("showing token ids: %s", e)
        note = f"Token ids are shown instead of text: the tokenizer of the cache's model could not be loaded ({e})."
        return (lambda i: f"[{i}]"), " ".join(note.split())
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


def layer_runs(blocks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _heading(summary: LatentSummary, layers: tuple[int, ...]) -> str:
    """'Latent j: activation mass m, mean layer x, active at layers a-b'; the mean is interpolated between
    the block indices of neighbouring layer positions."""
    if summary.mass <= 0:
        return f"Latent {summary.latent}: never active"
    at = layer_runs([layers[i] for i in np.flatnonzero(summary.totals > 0)])
    mean = block_mean(summary.mean_layer, layers)
    mass = f"{summary.mass:,.0f}" if summary.mass >= 100 else f"{summary.mass:.3g}"
    return f"Latent {summary.latent}: activation mass {mass}, mean layer {mean:.2f}, active at layers {at}"


def render_markdown(summaries: tuple[LatentSummary, ...], meta: LatentsMeta, decode: Decoder, intro: str) -> str:
    """One section per latent with a table of its examples; the activating token in bold."""
    lines = ["# Max-activating examples", "", intro, ""]
    for summary in summaries:
        lines += [f"## {_heading(summary, meta.layers)}", ""]
        if not summary.examples:
            lines += ["No example: this latent never fires on the rows used.", ""]
            continue
        lines += ["| layer | rank | activation | context |", "|---:|---:|---:|:---|"]
        for ex in summary.examples:
            left, token, right = split_context(ex, decode)
            context = f"{_md(left)}{_md_focus(token)}{_md(right)}"
            lines.append(f"| {meta.layers[ex.layer]} | {ex.rank + 1} | {ex.activation:.4g} | {context} |")
        lines.append("")
    return "\n".join(lines)


# one string, not a literal per name: store array names are spelled only by their owners (tests/test_architecture.py)
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


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}td.ctx{text-align:left;font-family:monospace;
white-space:pre}mark{background:#ffd166;font-weight:bold}"""


def render_html(summaries: tuple[LatentSummary, ...], meta: LatentsMeta, decode: Decoder, intro: str) -> str:
    """A static page: one table per latent, the activating token highlighted; all text escaped."""
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Max-activating examples</title>"
        f"<style>{_CSS}</style></head><body><h1>Max-activating examples</h1><p>{esc(intro)}</p>"
    ]
    for summary in summaries:
        parts.append(f"<h2>{esc(_heading(summary, meta.layers))}</h2>")
        if not summary.examples:
            parts.append("<p>No example: this latent never fires on the rows used.</p>")
            continue
        parts.append("<table><tr><th>layer</th><th>rank</th><th>activation</th><th>context</th></tr>")
        for ex in summary.examples:
            left, token, right = (esc(part) for part in split_context(ex, decode))
            parts.append(
                f"<tr><td>{meta.layers[ex.layer]}</td><td>{ex.rank + 1}</td><td>{ex.activation:.4g}</td>"
                f"<td class='ctx'>{left}<mark>{token}</mark>{right}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def describe(meta: LatentsMeta, cfg: ExamplesConfig, note: str | None) -> str:
    """The sentence above the tables: what was searched and how to read it."""
    rows = "all rows" if cfg.include_untrainable else "trainable rows (position 0 and special tokens skipped)"
    text = (
        f"Top {cfg.per_layer} activations per (latent, layer) over the {rows} of {meta.n_tokens:,} tokens "
        f"(SAE {meta.sae_path}: {meta.n_latents:,} latents, k={meta.k}); context: up to {cfg.context} tokens "
        "either side in the same window, the activating token highlighted."
    )
    return f"{text} {note}" if note else text


def write_examples(
    summaries: tuple[LatentSummary, ...], meta: LatentsMeta, cfg: ExamplesConfig, out: Path
) -> tuple[list[Path], str | None]:
    """Write examples.md, examples.tsv and examples.html into the directory `out`; returns them and the
    decoding note (None when text was decoded)."""
    decode, note = load_decoder(meta)
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


def run_examples(cfg: ExamplesConfig, progress: Progress = _no_progress) -> ExamplesResult:
    """Find the examples of the latents store cfg.latents and write OUT/examples.{md,tsv,html}."""
    latents = Latents(cfg.latents)
    found = find_examples(latents, cfg, progress)
    with output_dir(cfg.out, "examples") as tmp:
        files, note = write_examples(found, latents.meta, cfg, tmp)
    return ExamplesResult(found, tuple(Path(cfg.out) / f.name for f in files), note)
