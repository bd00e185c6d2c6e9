"""Read the outputs of the analysis commands, draw their figures, and gather everything into report.md.

Inputs: a `variance` OUT (variance.zarr + summary.json), optionally a `mlsae-train eval --out` JSON, a
`cosine` OUT (cosine.json), a `mlsae-train compare` OUT (compare.json: adds the Findings section of
`findings.py`), directories of further PNGs (e.g. `prompt-heatmap` outputs) and an `examples` OUT. The report
directory is self-contained: figures are drawn or copied into it and linked by relative paths, so it can be
moved or shared whole; `write_report` checks that every link resolves.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlsae_analyze import plots
from mlsae_analyze.examples import layer_runs
from mlsae_analyze.findings import findings_section
from mlsae_analyze.latents import read_latents_meta
from mlsae_cache.errors import InputError, MlsaeError, NotFoundError, RuntimeFailure, StoreError
from mlsae_cache.store import read_meta
from mlsae_train.compare import CompareResult, comparison_figure

SUMMARY_MEANINGS = {
    "var_total": "Var(L): variance of the layer over all activation mass (triples (layer, token, latent) "
    "weighted by activation).",
    "var_within_latent": "E_J[Var(L|J)]: the layer variance left once the latent is known.",
    "var_within_token": "E_{T,J}[Var(L|T,J)]: the layer variance left once both the latent and the token are known.",
    "rel_var_latent": "var_within_latent / var_total: the share of the layer variance that remains within latents; "
    "1 minus it is explained by which latent fires.",
    "rel_var_token": "var_within_token / var_within_latent: the share of a latent's spread over layers that remains "
    "within one token; the paper's 'two orders of magnitude' (per-token spread far below per-latent spread) "
    "is a value of about 0.01.",
    "mean_layer_std": "Unweighted mean over active latents of the layer std sqrt(Var[L|j]), in layers (the paper's "
    "layer-std figures).",
    "frac_multi_layer": "Fraction of active latents active (at least min_count rows) at more than one layer.",
    "n_rows": "(token, layer) rows used: kept tokens times layers.",
}
REFERENCE_MEANINGS = {
    "exp_var_tf": "Mean over (token, latent) of the per-token layer variance (every pair weighs the same).",
    "exp_var_f": "Mean over latents of the layer variance of the latent's token-averaged distribution.",
    "var_l": "Layer variance of the distribution averaged over tokens and latents.",
    "rel_var_f": "exp_var_f / var_l: set beside rel_var_latent.",
    "rel_var_t": "exp_var_tf / exp_var_f: set beside rel_var_token (about 0.01 in the paper).",
    "n_windows": "Context windows averaged over.",
}
EVAL_COLUMNS = ("layer", "fvu", "mse", "l0", "n_rows")
FIGURE_NAMES = {"heatmap": "layer_heatmap.png", "histograms": "layer_histograms.png", "cosine": "cosine.png"}


@dataclass(frozen=True)
class VarianceOutput:
    """What `variance` wrote: probs [L, n]; layer_mean, layer_std [n]; the L block indices; summary.json."""

    path: Path
    probs: np.ndarray
    layer_mean: np.ndarray
    layer_std: np.ndarray
    layers: tuple[int, ...]
    summary: dict[str, Any]


def read_json(path: Path, what: str, hint: str) -> dict[str, Any]:
    """A JSON object from `path`; NotFoundError / StoreError naming `what` and how to get it otherwise."""
    if not path.is_file():
        raise NotFoundError(f"{what} {path} does not exist ({hint})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{what} {path} is not valid JSON: {e} ({hint})") from e
    if not isinstance(data, dict):
        raise StoreError(f"{what} {path} holds a {type(data).__name__}, not an object ({hint})")
    return data


def read_variance(path: Path) -> VarianceOutput:
    """Read a `variance` OUT directory (variance.zarr and summary.json)."""
    import xarray as xr

    hint = f"give the OUT of `mlsae-analyze variance LATENTS {path}`"
    if not path.is_dir():
        raise NotFoundError(f"variance output {path} does not exist or is not a directory ({hint})")
    summary = read_json(path / "summary.json", "variance summary", hint)
    try:
        ds = xr.open_zarr(str(path / "variance.zarr"), consolidated=False)
        names = ("probs", "layer_mean", "layer_std")
        arrays = [np.asarray(ds[name].values, dtype=np.float64) for name in names]
        layers = tuple(int(b) for b in ds["layer"].values)
    except (OSError, KeyError, ValueError) as e:
        raise StoreError(f"{path}/variance.zarr is missing or incomplete ({e}; {hint})") from e
    return VarianceOutput(path, *arrays, layers, summary)


def read_cosine(path: Path) -> dict[str, Any]:
    """The cosine.json of a `cosine` OUT directory, checked for one value per layer pair."""
    data = read_json(path / "cosine.json", "cosine output", f"give the OUT of `mlsae-analyze cosine CACHE {path}`")
    pairs, values = data.get("layer_pairs"), data.get("cosine")
    if not isinstance(pairs, list) or not isinstance(values, list) or len(pairs) != len(values) or not values:
        raise StoreError(f"{path}/cosine.json lacks matching `layer_pairs` and `cosine` lists (re-run `cosine`)")
    return data


def read_eval(path: Path) -> dict[str, Any]:
    """An eval JSON written by `mlsae-train eval --out`, checked for per-layer lists."""
    data = read_json(path, "eval file", "write one with `mlsae-train eval SAE CACHE --out FILE`")
    if not isinstance(data.get("layer"), list) or not isinstance(data.get("fvu"), list):
        raise StoreError(
            f"eval file {path} has no per-layer `layer` and `fvu` lists (give a `mlsae-train eval` output)"
        )
    return data


def _compare_row_ok(row: Any) -> bool:
    """A compare.json row: {"layer": int, "mlsae": {"fvu": number, ...}, "single": {...} | null}."""
    if not isinstance(row, dict) or isinstance(row.get("layer"), bool) or not isinstance(row.get("layer"), int):
        return False
    sides = [row.get("mlsae")] + ([row["single"]] if row.get("single") is not None else [])
    return all(isinstance(side, dict) and isinstance(side.get("fvu"), int | float) for side in sides)


def read_compare(path: Path) -> CompareResult:
    """The compare.json of a `mlsae-train compare` OUT directory, checked for one well-formed row per layer."""
    hint = f"give the OUT of `mlsae-train compare MLSAE {path} --cache CACHE --single L=DIR ...`"
    if not path.is_dir():
        raise NotFoundError(f"compare output {path} does not exist or is not a directory ({hint})")
    data = read_json(path / "compare.json", "compare output", hint)
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows or not all(_compare_row_ok(row) for row in rows):
        raise StoreError(f"{path}/compare.json lacks per-layer `rows` with `mlsae` and `single` metrics ({hint})")
    sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
    return CompareResult(rows, data.get("clean_ce"), data.get("n_windows"), sources)


def model_name(cache_path: str | Path) -> str:
    """The short name of the model a cache was harvested from ('unknown model' if the cache is unreadable)."""
    try:
        name = str(read_meta(cache_path).model.get("name", "imported"))
    except (MlsaeError, OSError, TypeError):
        return "unknown model"
    return Path(name).name if "/" in name else name


def source_title(summary: dict[str, Any]) -> str:
    """'<model> MLSAE (n latents, k=k)' from a variance summary; the model is looked up via the latents store."""
    try:
        model = model_name(read_latents_meta(summary["latents"]).cache_path)
    except (MlsaeError, OSError, KeyError, TypeError):
        model = "unknown model"
    return f"{model} MLSAE ({_number(summary.get('n_latents', '?'))} latents, k={summary.get('k', '?')})"


def variance_figures(
    variance: VarianceOutput, out: Path, title: str | None = None, cosine: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Draw the aggregate heatmap, the histograms and (given cosine.json data) the cosine plot into `out`.

    `title` (default: the model and SAE) starts every figure's title; the cosine plot, which does not
    depend on the SAE, defaults to the name of its cache's model instead.
    """
    sae_title = title or source_title(variance.summary)
    v = variance
    heatmap = out / FIGURE_NAMES["heatmap"]
    histograms = out / FIGURE_NAMES["histograms"]
    paths = {
        "heatmap": plots.layer_heatmap(
            v.probs, v.layer_mean, v.layers, heatmap, f"{sae_title}: where each latent fires"
        ),
        "histograms": plots.layer_histograms(
            v.layer_mean, v.layer_std, v.layers, histograms, f"{sae_title}: mean and spread over layers"
        ),
    }
    if cosine is not None:
        model = title or model_name(cosine.get("cache", ""))
        tokens = _number(cosine.get("n_tokens", "?"))
        what = f"adjacent-layer cosine similarity of the mean-centred residual stream\n({tokens} tokens)"
        paths["cosine"] = plots.cosine_plot(
            cosine["layer_pairs"], cosine["cosine"], out / FIGURE_NAMES["cosine"], f"{model}: {what}"
        )
    return paths


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a pipe would end the cell, even inside a code span."""
    return text.replace("|", "\\|")


def summary_section(summary: dict[str, Any]) -> list[str]:
    """Both modes of summary.json as tables, each number with what it means."""
    lines = ["## Variance decomposition over layers", "", "| quantity | value | meaning |", "|---|---:|---|"]
    lines += [f"| `{k}` | {_number(summary.get(k, 'n/a'))} | {_cell(m)} |" for k, m in SUMMARY_MEANINGS.items()]
    rel = summary.get("rel_var_token")
    if isinstance(rel, int | float) and 0 < rel < math.inf:
        ratio = f"{1 / rel:.3g} times less than across tokens: {math.log10(1 / rel):.2f} orders of magnitude"
        lines += [
            "",
            f"Here `rel_var_token` = {rel:.4g}: within one token a latent spreads over layers {ratio} "
            "(about two in the paper).",
        ]
    ref = summary.get("reference", {})
    lines += [
        "",
        "### Reference mode",
        "",
        "Computed as the reference code does (per context window, every (token, latent) pair weighted equally "
        "whether it fires or not, unnormalised mixtures, then averaged over windows), so it can be set beside "
        "published numbers; it is not the same quantity as the table above.",
        "",
        "| quantity | value | meaning |",
        "|---|---:|---|",
    ]
    lines += [f"| `{k}` | {_number(ref.get(k, 'n/a'))} | {_cell(m)} |" for k, m in REFERENCE_MEANINGS.items()]
    return lines + [""]


def eval_section(data: dict[str, Any]) -> list[str]:
    """The per-layer eval table, then its scalar numbers."""
    n = len(data["layer"])
    columns = [c for c in EVAL_COLUMNS if c in data] + [
        k for k, v in data.items() if k not in EVAL_COLUMNS and isinstance(v, list) and len(v) == n
    ]
    lines = ["## Reconstruction per layer (eval)", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "---:|" * len(columns))
    for i in range(n):
        lines.append("| " + " | ".join(_number(data[c][i]) if i < len(data[c]) else "" for c in columns) + " |")
    scalars = [f"`{k}` {_number(v)}" for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return lines + (["", "Overall: " + ", ".join(scalars) + "."] if scalars else []) + [""]


def cosine_section(data: dict[str, Any], figure: str) -> list[str]:
    lines = ["## Adjacent-layer cosine similarity", "", f"![adjacent-layer cosine similarity]({figure})", ""]
    n_tokens = _number(data.get("n_tokens", "?"))
    lines += [f"Mean over {n_tokens} tokens of `cos(x_l - m_l, x_l+1 - m_l+1)`, m_l the mean of layer l.", ""]
    lines += ["| layers | cosine |", "|---|---:|"]
    lines += [f"| {a} → {b} | {v:.4f} |" for (a, b), v in zip(data["layer_pairs"], data["cosine"], strict=True)]
    return lines + [""]


@dataclass(frozen=True)
class ReportConfig:
    """What goes into the report: a variance OUT, and optionally an eval JSON, a cosine OUT, directories of
    PNGs to include, an examples OUT, a title (default: the model and SAE) and a compare OUT (Findings)."""

    variance: Path
    eval: Path | None = None
    cosine: Path | None = None
    figures: tuple[Path, ...] = ()
    examples: Path | None = None
    title: str | None = None
    compare: Path | None = None


EXAMPLE_FILES = ("examples.md", "examples.html", "examples.tsv")


def check_extras(cfg: ReportConfig) -> None:
    """Refuse a --figures directory without PNGs and an --examples directory without its three files."""
    for src in cfg.figures:
        if not src.is_dir() or not any(src.glob("*.png")):
            raise InputError(
                f"--figures {src} holds no PNG file (give a directory written by heatmap or prompt-heatmap)"
            )
    if cfg.examples and not all((cfg.examples / name).is_file() for name in EXAMPLE_FILES):
        raise NotFoundError(
            f"--examples {cfg.examples} lacks {', '.join(EXAMPLE_FILES)} (give the OUT of `mlsae-analyze examples`)"
        )


def copy_figures(sources: tuple[Path, ...], out: Path) -> list[str]:
    """Copy the PNGs of each source directory into out/figures/<i>-<its name>/; Markdown lines linking them."""
    lines: list[str] = []
    for i, src in enumerate(sources):
        pngs = sorted(src.glob("*.png"))
        dest = out / "figures" / f"{i}-{src.name}"
        dest.mkdir(parents=True)
        lines += [f"### {src.name}", ""]
        for png in pngs:
            shutil.copy2(png, dest / png.name)
            lines += [f"![{png.stem}]({(dest / png.name).relative_to(out).as_posix()})", ""]
    return (["## More figures", "", *lines]) if lines else []


def copy_examples(src: Path, out: Path) -> list[str]:
    """Copy an `examples` OUT into out/examples/; Markdown lines linking its files."""
    (out / "examples").mkdir()
    for name in EXAMPLE_FILES:
        shutil.copy2(src / name, out / "examples" / name)
    links = ", ".join(f"[{name}](examples/{name})" for name in EXAMPLE_FILES)
    return ["## Max-activating examples", "", f"Top contexts per latent and layer: {links}.", ""]


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def check_links(report: Path) -> None:
    """Every relative link of the Markdown file must name an existing file beside it."""
    missing = [
        link for link in _LINK.findall(report.read_text(encoding="utf-8")) if not (report.parent / link).is_file()
    ]
    if missing:
        raise RuntimeFailure(f"report {report} links missing files {missing} (please report this bug)")


def title_section(variance: VarianceOutput, title: str) -> list[str]:
    """Title and where the numbers come from."""
    s = variance.summary
    return [
        f"# {title}: analysis over layers",
        "",
        f"Latents `{s.get('latents', '?')}`: {_number(s.get('n_latents', '?'))} latents, k={s.get('k', '?')}, "
        f"layers {layer_runs(list(s.get('layers', variance.layers)))}; {_number(s.get('n_rows', '?'))} rows; "
        f"{'all rows' if s.get('include_untrainable') else 'trainable rows only'}, min_count {s.get('min_count', 1)}.",
        "",
    ]


def heatmap_section(link: dict[str, str]) -> list[str]:
    """The two aggregate figures."""
    return [
        "## Where latents fire over layers",
        "",
        "Each column is one latent that fires somewhere, sorted by its mean layer; colour is the share of its "
        "activation at each layer (paper Figure 1).",
        "",
        f"![distribution of latents over layers]({link['heatmap']})",
        "",
        f"![mean layer and layer std of each latent]({link['histograms']})",
        "",
    ]


def write_report(cfg: ReportConfig, out: Path) -> Path:
    """Draw and copy the figures into the directory `out` and write out/report.md; returns its path.

    Every input is read before anything is drawn, so a bad one fails fast.
    """
    variance = read_variance(cfg.variance)
    cosine = read_cosine(cfg.cosine) if cfg.cosine else None
    evaluation = read_eval(cfg.eval) if cfg.eval else None
    comparison = read_compare(cfg.compare) if cfg.compare else None
    check_extras(cfg)
    title = cfg.title or source_title(variance.summary)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = variance_figures(variance, out / "figures", title, cosine)
    if comparison is not None:
        figures["compare"] = plots.save_png(comparison_figure(comparison), out / "figures" / "compare.png")
    link = {key: path.relative_to(out).as_posix() for key, path in figures.items()}
    lines = title_section(variance, title)
    lines += findings_section(variance.summary, cosine, comparison, link["compare"]) if comparison else []
    lines += heatmap_section(link)
    lines += summary_section(variance.summary)
    lines += eval_section(evaluation) if evaluation else []
    lines += cosine_section(cosine, link["cosine"]) if cosine else []
    lines += copy_figures(cfg.figures, out)
    lines += copy_examples(cfg.examples, out) if cfg.examples else []
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    check_links(report)
    return report
