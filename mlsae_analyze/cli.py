"""`mlsae-analyze`: encode a cache with an SAE, and analyse where latents fire over layers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from mlsae_cache.core.cli import done_line, mlsae_group, progress

SCHEDULER_HELP = "threads, processes, sync, or a dask.distributed address tcp://host:port."


@mlsae_group
def main() -> None:
    """Analyse the latents of a multi-layer SAE: distributions over layers and variance decompositions."""


@main.command()
@click.argument("sae")
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace latents of another SAE or cache.")
@click.option("--allow-unfinished", is_flag=True, help="Use an SAE checkpoint whose fit has not finished.")
@click.pass_context
def encode(ctx: click.Context, **options: Any) -> None:
    """Store the top-k latents of every (token, layer) row of CACHE under SAE in OUT (resumable)."""
    from mlsae_analyze.encode import EncodeConfig, run_encode

    cfg = EncodeConfig(**options)
    started = time.monotonic()
    with progress(ctx, "encode", "token") as advance:
        result = run_encode(cfg, progress=advance)
    click.echo(result.message)
    if not result.noop:
        click.echo(done_line(cfg.out, started, f"mlsae-analyze variance {cfg.out} VARIANCE_DIR"))


@main.command()
@click.argument("latents", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--min-count", default=1, show_default=True, type=int, help="Rows for a layer to count as active.")
@click.option("--include-untrainable", is_flag=True, help="Keep special tokens and position 0.")
@click.option("--scheduler", default="threads", show_default=True, help=SCHEDULER_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an output of this command made from other inputs.")
def variance(**options: Any) -> None:
    """Distributions of latents over layers and the variance decompositions, in OUT/variance.zarr and
    OUT/summary.json."""
    from mlsae_analyze.variance import VarianceConfig, format_summary, run_variance

    cfg = VarianceConfig(**options)
    started = time.monotonic()
    result = run_variance(cfg)
    click.echo(format_summary(result.summary))
    click.echo(f"wrote {cfg.out}/variance.zarr and {cfg.out}/summary.json")
    click.echo(done_line(cfg.out, started, f"mlsae-analyze report REPORT_DIR --variance {cfg.out}"))


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--scheduler", default="threads", show_default=True, help=SCHEDULER_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an output of this command made from other inputs.")
def cosine(**options: Any) -> None:
    """Adjacent-layer cosine similarity of the mean-centred residual stream of CACHE, in OUT/cosine.json."""
    from mlsae_analyze.cosine import CosineConfig, run_cosine

    cfg = CosineConfig(**options)
    result = run_cosine(cfg)
    for (a, b), value in zip(result.layer_pairs, result.cosine, strict=True):
        click.echo(f"layers {a:>3} -> {b:<3} cosine {value:.4f}")
    click.echo(f"wrote {cfg.out}/cosine.json")


TITLE_HELP = "Title of the figures (default: the model and the SAE's size)."


@main.command()
@click.argument("variance", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cosine", type=click.Path(path_type=Path), help="A `cosine` OUT: also draw its plot.")
@click.option("--compare", type=click.Path(path_type=Path), help="A `mlsae-train compare` OUT: also draw its figure.")
@click.option("--title", default=None, help=TITLE_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an output of this command made from other inputs.")
def heatmap(**options: Any) -> None:
    """Figures of a `variance` OUT: OUT/layer_heatmap.png (paper Figure 1) and OUT/layer_histograms.png, plus
    OUT/cosine.png with --cosine and OUT/compare.png with --compare."""
    from mlsae_analyze.report import HeatmapConfig, run_heatmap

    paths = run_heatmap(HeatmapConfig(**options))
    click.echo(f"wrote {', '.join(map(str, paths))}")


@main.command("prompt-heatmap")
@click.argument("sae")
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--text", required=True, help="The prompt (untrainable tokens are skipped, as in the cache).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--model", default=None, help="Run this model instead of the cache's (needed for an imported cache).")
@click.option("--title", default=None, help="Figure title (default: the model and the start of the prompt).")
@click.option("--allow-unfinished", is_flag=True, help="Use an SAE checkpoint whose fit has not finished.")
@click.option("--overwrite", is_flag=True, help="Replace an output of this command made from other inputs.")
def prompt_heatmap(**options: Any) -> None:
    """Where the latents of one prompt fire over layers (activations summed over its tokens), in
    OUT/prompt_heatmap.png and OUT/prompt.json."""
    from mlsae_analyze.prompt import PromptConfig, run_prompt_heatmap
    from mlsae_cache.core.cli import silence_library_progress

    silence_library_progress()
    cfg = PromptConfig(**options)
    result = run_prompt_heatmap(cfg)
    click.echo(f"{len(result.latents)} latents active over {len(result.tokens)} tokens")
    click.echo(f"wrote {cfg.out}/prompt_heatmap.png and {cfg.out}/prompt.json")


@main.command()
@click.argument("latents", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--top", type=int, default=None, help="The N latents with most activation mass [default: 10].")
@click.option("--random", type=int, default=None, help="N latents drawn at random among those that fire.")
@click.option("--latents", "latent_ids", default=None, help="These latent ids, like 3,17.")
@click.option(
    "--mean-layer", default=None, help="Only latents whose mean layer lies in this range of blocks, e.g. 0-7."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --random.")
@click.option("--per-layer", default=5, show_default=True, type=int, help="Examples per (latent, layer).")
@click.option("--context", default=4, show_default=True, type=int, help="Tokens shown either side of each example.")
@click.option("--include-untrainable", is_flag=True, help="Keep special tokens and position 0.")
@click.option("--model", default=None, help="Decode tokens with this model's tokenizer (default: the cache's).")
@click.option("--overwrite", is_flag=True, help="Replace an output of this command made from other inputs.")
@click.pass_context
def examples(ctx: click.Context, latent_ids: str | None, **options: Any) -> None:
    """Max-activating examples of each selected latent at each layer, in OUT/examples.md, OUT/examples.tsv
    and OUT/examples.html."""
    from mlsae_analyze.example_pages import run_examples
    from mlsae_analyze.examples import ExamplesConfig, parse_latent_ids
    from mlsae_cache.core.cli import silence_library_progress

    silence_library_progress()
    ids = parse_latent_ids(latent_ids) if latent_ids is not None else None
    cfg = ExamplesConfig(latent_ids=ids, **options)
    with progress(ctx, "examples", "token") as advance:
        result = run_examples(cfg, progress=advance)
    if result.note:
        click.echo(result.note, err=True)
    click.echo(f"{len(result.summaries)} latents, {sum(len(s.examples) for s in result.summaries)} examples")
    click.echo(f"wrote {', '.join(map(str, result.files))}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--variance", required=True, type=click.Path(path_type=Path), help="A `variance` OUT.")
@click.option("--eval", "eval", type=click.Path(path_type=Path), help="A JSON of `mlsae-train eval --out`.")
@click.option("--cosine", type=click.Path(path_type=Path), help="A `cosine` OUT.")
@click.option("--figures", multiple=True, type=click.Path(path_type=Path), help="A directory of PNGs (repeatable).")
@click.option("--examples", type=click.Path(path_type=Path), help="An `examples` OUT.")
@click.option("--title", default=None, help=TITLE_HELP)
@click.option(
    "--compare",
    type=click.Path(path_type=Path),
    help="A `mlsae-train compare` OUT: add the Findings section (the paper's claims vs this run).",
)
@click.option(
    "--sae", type=click.Path(path_type=Path), help="The SAE directory (default: the one that encoded the latents)."
)
@click.option(
    "--study",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A directory with variance/ and eval.json of the MLSAE trained for one length (repeatable).",
)
@click.option(
    "--lens-variance",
    type=click.Path(path_type=Path),
    help="A `variance` OUT of the same MLSAE fitted with a tuned lens: add the lens-vs-plain section.",
)
@click.option("--lens-eval", type=click.Path(path_type=Path), help="The lens MLSAE's `mlsae-train eval --out` JSON.")
@click.option("--lens-kl", type=click.Path(path_type=Path), help="An `mlsae-train eval-lens --out` directory.")
@click.option("--overwrite", is_flag=True, help="Replace an output of this command made from other inputs.")
def report(**options: Any) -> None:
    """One self-contained report, OUT/report.md and OUT/report.html, with the SAE's settings and training curve,
    the cache, and the numbers and figures of the given analysis outputs; with --compare, a Findings section sets
    them beside the paper's claims."""
    from mlsae_analyze.report import ReportConfig, run_report

    click.echo(f"wrote {run_report(ReportConfig(**options))}")


@main.command()
@click.argument("latents", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--variance", required=True, type=click.Path(path_type=Path), help="The `variance` OUT of LATENTS.")
@click.option("--sae", required=True, help="The SAE (directory or hub id) that encoded LATENTS.")
@click.option("--cache", type=click.Path(path_type=Path), help="The cache of LATENTS [default: the one it names].")
@click.option("--model", default=None, help="Model for the logit effects and token text [default: the cache's].")
@click.option("--logits/--no-logits", default=True, show_default=True, help="Compute logit effects (loads a model).")
@click.option("--eval", "eval", type=click.Path(path_type=Path), help="A JSON of `mlsae-train eval --out` to show.")
@click.option("--top", default=20, show_default=True, type=int, help="Strongest examples per latent and tab.")
@click.option("--random", default=20, show_default=True, type=int, help="Random examples per latent and tab.")
@click.option("--quantiles", default=5, show_default=True, type=int, help="Quantile groups per latent and tab.")
@click.option("--per-quantile", default=4, show_default=True, type=int, help="Examples per quantile group.")
@click.option("--bins", default=32, show_default=True, type=int, help="Bins of the activation histograms.")
@click.option("--similar", default=10, show_default=True, type=int, help="Nearest latents by decoder cosine.")
@click.option("--logit-tokens", default=10, show_default=True, type=int, help="Logit-effect tokens per sign.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random and quantile draws.")
@click.option("--allow-unfinished", is_flag=True, help="Use an SAE checkpoint whose fit has not finished.")
@click.option("--overwrite", is_flag=True, help="Replace an index of other stores.")
@click.pass_context
def index(ctx: click.Context, **options: Any) -> None:
    """Precompute what `explore` shows about every latent of LATENTS into the index OUT (three passes over the
    store; a re-run on unchanged stores does nothing)."""
    from mlsae_analyze.explorer.build import IndexConfig, run_index

    cfg = IndexConfig(**options)
    with progress(ctx, "index", "token") as advance:
        result = run_index(cfg, progress=advance)
    click.echo(result.message)
    if result.meta.logits_note:
        click.echo(f"no logit effects: {result.meta.logits_note}", err=True)
    click.echo(f"explore it: mlsae-analyze explore {cfg.out}")


@main.command()
@click.argument("index", type=click.Path(path_type=Path))
@click.option(
    "--model",
    default=None,
    help="Run this model (or `cache`: the cache's own) with the SAE: turns on the prompt page, logits and steering.",
)
@click.option("--device", default="auto", show_default=True, help="Device of the live model: auto, cpu or cuda.")
@click.option("--max-prompt-tokens", default=256, show_default=True, type=int, help="Longest prompt the model runs.")
@click.option("--latents", type=click.Path(path_type=Path), help="Read the latents here, not where the index says.")
@click.option("--variance", type=click.Path(path_type=Path), help="Read the variance output here.")
@click.option("--sae", type=click.Path(path_type=Path), help="Read the SAE here.")
@click.option("--cache", type=click.Path(path_type=Path), help="Read the cache here.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (others need --token).")
@click.option("--port", default=8765, show_default=True, type=int, help="Port to listen on (0: any free port).")
@click.option("--token", default=None, help="A secret every request must carry (required off loopback).")
@click.option("--root-path", default="", help="Path prefix of a reverse proxy in front, like /explorer.")
def explore(**options: Any) -> None:
    """Serve the pages and JSON API of the explorer INDEX (built by `index`) until Ctrl-C."""
    from mlsae_analyze.explorer.serve import ExploreConfig, announce, create_app, listen, serve, stale_warning
    from mlsae_cache.core.cli import silence_library_progress

    silence_library_progress()
    cfg = ExploreConfig(**options)
    app = create_app(cfg)
    warning = stale_warning(app)
    if warning:
        click.echo(warning, err=True)
    sock = listen(cfg)
    for line in announce(cfg, sock.getsockname()[1]):
        click.echo(line)
    serve(app, sock, cfg.root_path)


@main.command(name="export-delphi")
@click.argument("latents", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--per-layer/--pooled",
    default=True,
    show_default=True,
    help="One delphi module per layer, or one over every (layer, window) pair.",
)
@click.option("--n-splits", default=5, show_default=True, type=int, help="Files per module (ranges of latents).")
@click.option("--cache", type=click.Path(path_type=Path), help="The latents' cache, for the model name and dataset.")
@click.option("--include-untrainable", is_flag=True, help="Keep special tokens and position 0.")
@click.option("--overwrite", is_flag=True, help="Replace an output of this command made from other inputs.")
@click.pass_context
def export_delphi(ctx: click.Context, **options: Any) -> None:
    """Write LATENTS in delphi's latent cache layout under OUT/latents (read by delphi's LatentDataset)."""
    from mlsae_analyze.delphi import DelphiConfig, run_export_delphi

    cfg = DelphiConfig(**options)
    with progress(ctx, "export-delphi", "token") as advance:
        result = run_export_delphi(cfg, advance)
    click.echo(
        f"wrote {len(result.modules)} modules ({result.modules[0]}, ...) in {cfg.out}/latents: {result.n_windows} "
        f"windows of {result.context} tokens, {result.n_locations:,} active latents"
    )
