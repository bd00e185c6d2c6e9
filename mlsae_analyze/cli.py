"""`mlsae-analyze`: encode a cache with an SAE, and analyse where latents fire over layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mlsae_cache.clikit import handle_errors, progress_bar, setup_logging

SCHEDULER_HELP = "threads, processes, sync, or a dask.distributed address tcp://host:port."


@click.group()
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--quiet", is_flag=True, help="No progress bars or info logs.")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Analyse the latents of a multi-layer SAE: distributions over layers and variance decompositions."""
    setup_logging(debug, quiet)
    ctx.obj = {"quiet": quiet}


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
