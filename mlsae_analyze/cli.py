"""`mlsae-analyze`: encode a cache with an SAE, and analyse where latents fire over layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mlsae_cache.clikit import handle_errors, mlsae_group, progress_bar

SCHEDULER_HELP = "threads, processes, sync, or a dask.distributed address tcp://host:port."


@mlsae_group
def main() -> None:
    """Analyse the latents of a multi-layer SAE: distributions over layers and variance decompositions."""


@main.command()
@click.argument("sae", type=click.Path(path_type=Path))
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace latents of another SAE or cache.")
@click.pass_context
@handle_errors
def encode(ctx: click.Context, sae: Path, cache: Path, out: Path, device: str, overwrite: bool) -> None:
    """Store the top-k latents of every (token, layer) row of CACHE under SAE in OUT (resumable)."""
    from mlsae_analyze.encode import EncodeConfig
    from mlsae_analyze.encode import encode as run_encode
    from mlsae_cache.store import read_meta

    total = read_meta(cache).n_tokens
    with progress_bar(total, "tok", ctx.obj["quiet"], "encode") as advance:
        result = run_encode(EncodeConfig(sae, cache, out, device, overwrite), progress=advance)
    click.echo(result.message)


def format_summary(summary: dict[str, Any]) -> str:
    keys = (
        "var_total",
        "var_within_latent",
        "var_within_token",
        "rel_var_latent",
        "rel_var_token",
        "mean_layer_std",
        "frac_multi_layer",
        "n_rows",
    )
    lines = [f"{k:<18} {summary[k]:.6g}" for k in keys]
    ref = summary["reference"]
    lines.append("reference mode:   " + ", ".join(f"{k} {ref[k]:.4g}" for k in ("rel_var_f", "rel_var_t")))
    return "\n".join(lines)


@main.command()
@click.argument("latents", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--min-count", default=1, show_default=True, type=int, help="Rows for a layer to count as active.")
@click.option("--include-untrainable", is_flag=True, help="Keep special tokens and position 0.")
@click.option("--scheduler", default="threads", show_default=True, help=SCHEDULER_HELP)
@handle_errors
def variance(latents: Path, out: Path, min_count: int, include_untrainable: bool, scheduler: str) -> None:
    """Distributions of latents over layers and the variance decompositions, in OUT/variance.zarr and
    OUT/summary.json."""
    from mlsae_analyze.latents import open_latents
    from mlsae_analyze.outputs import output_dir
    from mlsae_analyze.variance import compute_variance

    ds, meta = open_latents(latents)
    result, summary = compute_variance(
        ds, meta.n_latents, min_count=min_count, include_untrainable=include_untrainable, scheduler=scheduler
    )
    summary = {
        **summary,
        "latents": str(latents),
        "n_latents": meta.n_latents,
        "k": meta.k,
        "layers": list(meta.layers),
        "sae_fingerprint": meta.sae_fingerprint,
        "cache_fingerprint": meta.cache_fingerprint,
        "min_count": min_count,
        "include_untrainable": include_untrainable,
    }
    with output_dir(out, "variance") as tmp:
        result.to_zarr(tmp / "variance.zarr", mode="w", consolidated=False)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(format_summary(summary))
    click.echo(f"wrote {out}/variance.zarr and {out}/summary.json")


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--scheduler", default="threads", show_default=True, help=SCHEDULER_HELP)
@handle_errors
def cosine(cache: Path, out: Path, scheduler: str) -> None:
    """Adjacent-layer cosine similarity of the mean-centred residual stream of CACHE, in OUT/cosine.json."""
    from mlsae_analyze.cosine import adjacent_cosine
    from mlsae_analyze.outputs import output_dir
    from mlsae_cache.store import Cache

    result = {**adjacent_cosine(Cache(cache), scheduler), "cache": str(cache)}
    with output_dir(out, "cosine") as tmp:
        (tmp / "cosine.json").write_text(json.dumps(result, indent=2) + "\n")
    for (a, b), value in zip(result["layer_pairs"], result["cosine"], strict=True):
        click.echo(f"layers {a:>3} -> {b:<3} cosine {value:.4f}")
    click.echo(f"wrote {out}/cosine.json")


TITLE_HELP = "Title of the figures (default: the model and the SAE's size)."


@main.command()
@click.argument("variance_dir", metavar="VARIANCE", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cosine", "cosine_dir", type=click.Path(path_type=Path), help="A `cosine` OUT: also draw its plot.")
@click.option("--title", default=None, help=TITLE_HELP)
@handle_errors
def heatmap(variance_dir: Path, out: Path, cosine_dir: Path | None, title: str | None) -> None:
    """Figures of a `variance` OUT: OUT/layer_heatmap.png (paper Figure 1) and OUT/layer_histograms.png, plus
    OUT/cosine.png with --cosine."""
    from mlsae_analyze.outputs import output_dir
    from mlsae_analyze.report import read_cosine, read_variance, variance_figures

    variance_out = read_variance(variance_dir)
    cosine_out = read_cosine(cosine_dir) if cosine_dir else None
    with output_dir(out, "heatmap") as tmp:
        names = [path.name for path in variance_figures(variance_out, tmp, title, cosine_out).values()]
    click.echo(f"wrote {', '.join(f'{out}/{name}' for name in names)}")


@main.command("prompt-heatmap")
@click.argument("sae", type=click.Path(path_type=Path))
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--text", required=True, help="The prompt (position 0 is skipped, as in the cache).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--model", default=None, help="Run this model instead of the cache's (needed for an imported cache).")
@click.option("--title", default=None, help="Figure title (default: the model and the start of the prompt).")
@handle_errors
def prompt_heatmap(
    sae: Path, cache: Path, out: Path, text: str, device: str, model: str | None, title: str | None
) -> None:
    """Where the latents of one prompt fire over layers (activations summed over its tokens), in
    OUT/prompt_heatmap.png and OUT/prompt.json."""
    from mlsae_analyze import plots
    from mlsae_analyze.outputs import output_dir
    from mlsae_analyze.prompt import PromptConfig, prompt_layers, prompt_title
    from mlsae_cache.clikit import silence_library_progress

    silence_library_progress()
    result = prompt_layers(PromptConfig(sae, cache, text, device, model))
    with output_dir(out, "prompt-heatmap") as tmp:
        plots.layer_heatmap(
            result.probs,
            result.layer_mean,
            result.layers,
            tmp / "prompt_heatmap.png",
            title or prompt_title(result, text),
        )
        (tmp / "prompt.json").write_text(json.dumps({"text": text, **result.to_dict()}, indent=2) + "\n")
    click.echo(f"{len(result.latents)} latents active over {len(result.tokens)} tokens")
    click.echo(f"wrote {out}/prompt_heatmap.png and {out}/prompt.json")


@main.command()
@click.argument("latents", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--top", type=int, default=None, help="Show the N latents with most activation mass [default: 10].")
@click.option("--latents", "latent_ids", default=None, help="Show these latent ids instead, like 3,17.")
@click.option("--per-layer", default=5, show_default=True, type=int, help="Examples per (latent, layer).")
@click.option("--context", default=4, show_default=True, type=int, help="Tokens shown either side of each example.")
@click.option("--include-untrainable", is_flag=True, help="Keep special tokens and position 0.")
@click.pass_context
@handle_errors
def examples(
    ctx: click.Context,
    latents: Path,
    out: Path,
    top: int | None,
    latent_ids: str | None,
    per_layer: int,
    context: int,
    include_untrainable: bool,
) -> None:
    """Max-activating examples of each selected latent at each layer, in OUT/examples.md, OUT/examples.tsv
    and OUT/examples.html."""
    from mlsae_analyze.examples import ExamplesConfig, find_examples, parse_latent_ids, write_examples
    from mlsae_analyze.latents import open_latents
    from mlsae_analyze.outputs import output_dir
    from mlsae_cache.clikit import silence_library_progress
    from mlsae_cache.errors import InputError

    silence_library_progress()
    if top is not None and latent_ids is not None:
        raise InputError("give --top or --latents, not both")
    ids = parse_latent_ids(latent_ids) if latent_ids is not None else None
    cfg = ExamplesConfig(ids, 10 if top is None else top, per_layer, context, include_untrainable)
    ds, meta = open_latents(latents)
    with progress_bar(2 * meta.n_tokens, "tok", ctx.obj["quiet"], "examples") as advance:
        found = find_examples(ds, meta, cfg, progress=advance)
    with output_dir(out, "examples") as tmp:
        files, note = write_examples(found, meta, cfg, tmp)
    if note:
        click.echo(note, err=True)
    click.echo(f"{len(found)} latents, {sum(len(s.examples) for s in found)} examples")
    click.echo(f"wrote {', '.join(f'{out}/{path.name}' for path in files)}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--variance", "variance_dir", required=True, type=click.Path(path_type=Path), help="A `variance` OUT.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="A JSON of `mlsae-train eval --out`.")
@click.option("--cosine", "cosine_dir", type=click.Path(path_type=Path), help="A `cosine` OUT.")
@click.option(
    "--figures", "figure_dirs", multiple=True, type=click.Path(path_type=Path), help="A directory of PNGs (repeatable)."
)
@click.option("--examples", "examples_dir", type=click.Path(path_type=Path), help="An `examples` OUT.")
@click.option("--title", default=None, help=TITLE_HELP)
@click.option(
    "--compare",
    "compare_dir",
    type=click.Path(path_type=Path),
    help="A `mlsae-train compare` OUT: add the Findings section (the paper's claims vs this run).",
)
@handle_errors
def report(
    out: Path,
    variance_dir: Path,
    eval_file: Path | None,
    cosine_dir: Path | None,
    figure_dirs: tuple[Path, ...],
    examples_dir: Path | None,
    title: str | None,
    compare_dir: Path | None,
) -> None:
    """One self-contained page, OUT/report.md, with the numbers and figures of the given analysis outputs; with
    --compare, a Findings section sets them beside the paper's claims."""
    from mlsae_analyze.outputs import output_dir
    from mlsae_analyze.report import ReportConfig, write_report

    cfg = ReportConfig(variance_dir, eval_file, cosine_dir, figure_dirs, examples_dir, title, compare_dir)
    with output_dir(out, "report") as tmp:
        write_report(cfg, tmp)
    click.echo(f"wrote {out}/report.md")
