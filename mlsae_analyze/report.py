"""Read the outputs of the analysis commands, draw their figures, and gather everything into report.md.

Inputs: a `variance` OUT (variance.zarr + summary.json), optionally a `mlsae-train eval --out` JSON, a
`cosine` OUT (cosine.json), a `mlsae-train compare` OUT (compare.json: adds the Findings section of
`findings.py`), directories of further PNGs (e.g. `prompt-heatmap` outputs) and an `examples` OUT. The report
directory is self-contained: figures are drawn or copied into it and linked by relative paths, so it can be
moved or shared whole; `write_report` checks that every link resolves.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mlsae_analyze import plots
from mlsae_analyze.comparison import comparison_figure
from mlsae_analyze.findings import findings_section
from mlsae_analyze.latents import read_latents_meta
from mlsae_analyze.layers import layer_runs
from mlsae_analyze.lens_report import lens_figures, lens_section
from mlsae_analyze.report_parts import cache_section, examples_excerpt, read_study_point, sae_section, to_html
from mlsae_analyze.results import COSINE_JSON, CosineResult, VarianceOutput, VarianceSummary
from mlsae_cache.core.errors import InputError, MlsaeError, NotFoundError, RuntimeFailure
from mlsae_cache.core.outputs import output_dir
from mlsae_cache.store import read_meta
from mlsae_train.lens_eval import LENS_EVAL_JSON, LensEvalResult
from mlsae_train.results import COMPARE_JSON, CompareResult, EvalResult

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
FIGURE_NAMES = {
    "multi_layer": "multi_layer.png",
    "heatmap": "layer_heatmap.png",
    "histograms": "layer_histograms.png",
    "cosine": "cosine.png",
    "compare": "compare.png",
}


def model_name(cache_path: str | Path) -> str:
    """The short name of the model a cache was harvested from ('unknown model' if the cache is unreadable)."""
    try:
        name = str(read_meta(cache_path).model.get("name", "imported"))
    except (MlsaeError, OSError, TypeError):
        return "unknown model"
    return Path(name).name if "/" in name else name


def source_title(summary: VarianceSummary) -> str:
    """'<model> MLSAE (n latents, k=k)' from a variance summary; the model is looked up via the latents store."""
    try:
        model = model_name(read_latents_meta(str(summary.latents)).cache_path)
    except (MlsaeError, OSError, TypeError):
        model = "unknown model"
    return f"{model} MLSAE ({_number(summary.n_latents or '?')} latents, k={summary.k or '?'})"


def variance_figures(
    variance: VarianceOutput,
    out: Path,
    title: str | None = None,
    cosine: CosineResult | None = None,
    compare: CompareResult | None = None,
) -> dict[str, Path]:
    """Draw the aggregate heatmap, the histograms and (given their results) the cosine plot and the comparison
    figure into `out`.

    `title` (default: the model and SAE) starts every figure's title; the cosine plot, which does not
    depend on the SAE, defaults to the name of its cache's model instead.
    """
    sae_title = title or source_title(variance.summary)
    v = variance
    paths = {
        "heatmap": plots.layer_heatmap(
            v.probs, v.layer_mean, v.layers, out / FIGURE_NAMES["heatmap"], f"{sae_title}: where each latent fires"
        ),
        "histograms": plots.layer_histograms(
            v.layer_mean,
            v.layer_std,
            v.layers,
            out / FIGURE_NAMES["histograms"],
            f"{sae_title}: mean and spread over layers",
        ),
    }
    if v.summary.multi_layer:
        what = f"{sae_title}: latents active at several layers, by threshold"
        fig = plots.multi_layer_figure(v.summary.multi_layer, what)
        paths["multi_layer"] = plots.save_png(fig, out / FIGURE_NAMES["multi_layer"])
    if cosine is not None:
        model = title or model_name(cosine.cache or "")
        what = (
            f"adjacent-layer cosine similarity of the mean-centred residual stream\n({_number(cosine.n_tokens)} tokens)"
        )
        paths["cosine"] = plots.cosine_plot(
            cosine.layer_pairs, cosine.cosine, out / FIGURE_NAMES["cosine"], f"{model}: {what}"
        )
    if compare is not None:
        paths["compare"] = plots.save_png(comparison_figure(compare), out / FIGURE_NAMES["compare"])
    return paths


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a pipe would end the cell, even inside a code span."""
    return text.replace("|", "\\|")


def summary_section(summary: VarianceSummary) -> list[str]:
    """The pooled numbers, both per-window modes and the multi-layer curve of summary.json, each number with what
    it means."""
    lines = [
        "## Variance decomposition over layers",
        "",
        "Pooled over every (layer, token, latent), weighted by activation: the numbers to cite.",
        "",
        "| quantity | value | meaning |",
        "|---|---:|---|",
    ]
    lines += [f"| `{k}` | {_number(getattr(summary, k))} | {_cell(m)} |" for k, m in SUMMARY_MEANINGS.items()]
    rel = summary.rel_var_token
    if isinstance(rel, int | float) and 0 < rel < math.inf:
        ratio = f"{1 / rel:.3g} times less than across tokens: {math.log10(1 / rel):.2f} orders of magnitude"
        lines += [
            "",
            f"Here `rel_var_token` = {rel:.4g}: within one token a latent spreads over layers {ratio} "
            "(about two in the paper).",
        ]
    lines += _mode_table(
        "### Window mode",
        "Per context window, every mixture over layers normalised, then averaged over windows: a variance of a "
        "distribution, like the pooled numbers, but each window weighs the same and each (token, latent) pair that "
        "fires weighs the same whatever its activation.",
        summary.window or {},
    )
    lines += _mode_table(
        "### Reference mode (not invariant to layer labels)",
        "Computed as the reference code does (per context window, every (token, latent) pair weighted equally "
        "whether it fires or not, mixtures not normalised, then averaged over windows), so it can be set beside "
        "numbers from that code. It is not a variance: it moves when the layers are relabelled (docs/METHOD.md, "
        "section 6), and no verdict uses it.",
        summary.reference or {},
    )
    curve = summary.multi_layer or {}
    if curve:
        lines += ["### Latents active at several layers", ""]
        lines += ["![latents active at several layers](figures/multi_layer.png)", ""]
        lines += ["| a layer counts from | latents active at 2+ layers |"]
        lines += ["|---|---:|"]
        lines += [f"| {float(s):.0%} of the latent's mass | {v:.1%} |" for s, v in curve.get("by_share", {}).items()]
        lines += [f"| {r} row(s) | {v:.1%} |" for r, v in curve.get("by_rows", {}).items()]
        lines += [""]
    return lines


def _mode_table(heading: str, text: str, numbers: dict[str, Any]) -> list[str]:
    if not numbers:
        return []
    lines = ["", heading, "", text, "", "| quantity | value | meaning |", "|---|---:|---|"]
    lines += [f"| `{k}` | {_number(numbers.get(k, 'n/a'))} | {_cell(m)} |" for k, m in REFERENCE_MEANINGS.items()]
    return [*lines, ""]


def eval_section(result: EvalResult) -> list[str]:
    """The per-layer eval table, then its overall numbers."""
    columns: dict[str, Any] = {
        "layer": result.layer,
        "fvu": result.fvu,
        "mse": result.mse,
        "l0": result.l0,
        "n_rows": result.n_rows,
    }
    if result.spliced:
        columns |= {"delta_ce": result.delta_ce, "kl": result.kl}
    lines = ["## Reconstruction per layer (eval)", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "---:|" * len(columns))
    for i in range(len(result.layer)):
        lines.append("| " + " | ".join(_number(values[i]) for values in columns.values()) + " |")
    scalars: dict[str, float | None] = {"dead_fraction": result.dead_fraction, "fvu_mean": result.fvu_mean}
    if result.spliced:
        scalars |= {"clean_ce": result.clean_ce, "delta_ce_mean": result.delta_ce_mean, "kl_mean": result.kl_mean}
    overall = ", ".join(f"`{k}` {_number(v)}" for k, v in scalars.items())
    return [*lines, "", f"Overall: {overall}.", ""]


def cosine_section(result: CosineResult, figure: str) -> list[str]:
    lines = ["## Adjacent-layer cosine similarity", "", f"![adjacent-layer cosine similarity]({figure})", ""]
    n_tokens = _number(result.n_tokens)
    lines += [f"Mean over {n_tokens} tokens of `cos(x_l - m_l, x_l+1 - m_l+1)`, m_l the mean of layer l.", ""]
    lines += ["| layers | cosine |", "|---|---:|"]
    lines += [f"| {a} → {b} | {v:.4f} |" for (a, b), v in zip(result.layer_pairs, result.cosine, strict=True)]
    return [*lines, ""]


@dataclass(frozen=True)
class ReportConfig:
    """Everything `mlsae-analyze report` takes (CLI options map one-to-one onto these fields): the report
    directory, a variance OUT, and optionally an eval JSON, a cosine OUT, directories of PNGs to include, an
    examples OUT, a title (default: the model and SAE), a compare OUT (Findings), and the variance OUT, eval JSON
    and eval-lens OUT of the same MLSAE fitted with a tuned lens (the lens section, lens_report.py)."""

    out: Path
    variance: Path
    eval: Path | None = None
    cosine: Path | None = None
    figures: tuple[Path, ...] = ()
    examples: Path | None = None
    title: str | None = None
    compare: Path | None = None
    sae: Path | None = None
    study: tuple[Path, ...] = ()
    lens_variance: Path | None = None
    lens_eval: Path | None = None
    lens_kl: Path | None = None
    overwrite: bool = False


def _inputs(cfg: ReportConfig | HeatmapConfig) -> dict[str, Any]:
    """What an output of `report` or `heatmap` is made from: its input directories, resolved."""
    found: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "out":
            continue
        if isinstance(value, Path):
            found[f.name] = str(value.resolve())
        elif isinstance(value, tuple) and all(isinstance(v, Path) for v in value):
            found[f.name] = [str(v.resolve()) for v in value]
    return found


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
    lines = ["## Max-activating examples", "", f"Top contexts per latent and layer: {links}."]
    return lines + examples_excerpt(src) + [""]


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
    rows = "all rows" if s.include_untrainable else "trainable rows only"
    return [
        f"# {title}: analysis over layers",
        "",
        f"Latents `{s.latents or '?'}`: {_number(s.n_latents or '?')} latents, k={s.k or '?'}, "
        f"layers {layer_runs(list(s.layers or variance.layers))}; {_number(s.n_rows)} rows; "
        f"{rows}, min_count {s.min_count}.",
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
    variance = VarianceOutput.read(cfg.variance)
    cosine = CosineResult.read(cfg.cosine / COSINE_JSON) if cfg.cosine else None
    evaluation = EvalResult.read(cfg.eval) if cfg.eval else None
    comparison = CompareResult.read(cfg.compare / COMPARE_JSON) if cfg.compare else None
    check_extras(cfg)
    title = cfg.title or source_title(variance.summary)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = variance_figures(variance, out / "figures", title, cosine, comparison)
    link = {key: path.relative_to(out).as_posix() for key, path in figures.items()}
    sae_dir, cache_path = sources(cfg, variance)
    lines = title_section(variance, title)
    study = [read_study_point(path) for path in cfg.study]
    if comparison:
        lines += findings_section(variance.summary, cosine, comparison, link["compare"], study)
    lines += _lens_part(cfg, variance, evaluation, out)
    lines += sae_section(sae_dir, out / "figures", out) if sae_dir else []
    lines += cache_section(cache_path)
    lines += heatmap_section(link)
    lines += summary_section(variance.summary)
    lines += eval_section(evaluation) if evaluation else []
    lines += cosine_section(cosine, link["cosine"]) if cosine else []
    lines += copy_figures(cfg.figures, out)
    lines += copy_examples(cfg.examples, out) if cfg.examples else []
    report = out / REPORT_MD
    report.write_text("\n".join(lines), encoding="utf-8")
    check_links(report)
    (out / REPORT_HTML).write_text(to_html(report.read_text(encoding="utf-8"), title), encoding="utf-8")
    return report


REPORT_MD, REPORT_HTML = "report.md", "report.html"


def _lens_part(cfg: ReportConfig, plain: VarianceOutput, evaluation: EvalResult | None, out: Path) -> list[str]:
    """The lens-vs-plain section when --lens-variance is given (its figures drawn into out/figures)."""
    if cfg.lens_variance is None:
        return []
    lens = VarianceOutput.read(cfg.lens_variance)
    lens_eval = EvalResult.read(cfg.lens_eval) if cfg.lens_eval else None
    kl = LensEvalResult.read(cfg.lens_kl / LENS_EVAL_JSON) if cfg.lens_kl else None
    paths = lens_figures(plain, lens, kl, out / "figures")
    link = {key: path.relative_to(out).as_posix() for key, path in paths.items()}
    return lens_section(plain, lens, (evaluation, lens_eval), kl, link)


def sources(cfg: ReportConfig, variance: VarianceOutput) -> tuple[Path | None, str | None]:
    """The SAE directory (cfg.sae, else the one that encoded the latents) and its cache, where they can be found."""
    try:
        meta = read_latents_meta(str(variance.summary.latents))
    except (MlsaeError, OSError, TypeError):
        return cfg.sae, None
    sae = cfg.sae or Path(meta.sae_path)
    return (sae if (sae / "cfg.json").is_file() else None), meta.cache_path


def run_report(cfg: ReportConfig) -> Path:
    """Write the report directory cfg.out (report.md, figures/, examples/); returns the path of report.md."""
    with output_dir(cfg.out, "report", _inputs(cfg), cfg.overwrite) as tmp:
        write_report(cfg, tmp)
    return Path(cfg.out) / REPORT_MD


@dataclass(frozen=True)
class HeatmapConfig:
    """Everything `mlsae-analyze heatmap` takes; CLI options map one-to-one onto these fields."""

    variance: Path
    out: Path
    cosine: Path | None = None
    compare: Path | None = None
    title: str | None = None
    overwrite: bool = False


def run_heatmap(cfg: HeatmapConfig) -> list[Path]:
    """The figures of a `variance` OUT (and of a cosine and a compare OUT) into cfg.out; returns their paths."""
    variance = VarianceOutput.read(cfg.variance)
    cosine = CosineResult.read(cfg.cosine / COSINE_JSON) if cfg.cosine else None
    comparison = CompareResult.read(cfg.compare / COMPARE_JSON) if cfg.compare else None
    with output_dir(cfg.out, "heatmap", _inputs(cfg), cfg.overwrite) as tmp:
        names = [path.name for path in variance_figures(variance, tmp, cfg.title, cosine, comparison).values()]
    return [Path(cfg.out) / name for name in names]
