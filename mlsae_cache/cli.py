"""`mlsae-cache`: harvest, import, inspect and verify activation caches. A thin layer over the library."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from mlsae_cache.config import HarvestConfig, parse_layers
from mlsae_cache.core.cli import COUNT, done_line, mlsae_group, progress, silence_library_progress
from mlsae_cache.core.verifying import verify_path
from mlsae_cache.info import cache_info


@mlsae_group
def main() -> None:
    """Harvest the residual stream of every layer of a language model into a reusable Zarr cache."""


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--model", default="smollm2-135m", show_default=True, help="smollm2-135m, a hub id or a local directory.")
@click.option("--gguf-file", default=None, help="GGUF file name inside the model directory or repo.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--dataset", default="pydoc", show_default=True, help="pydoc, a hub id, or a .txt/.jsonl/.json/.parquet.")
@click.option("--dataset-config", default=None, help="Hub dataset configuration name.")
@click.option("--split", default="train", show_default=True, help="Hub dataset split.")
@click.option("--text-column", default="text", show_default=True, help="Column holding the text.")
@click.option("--streaming", is_flag=True, help="Stream the dataset instead of downloading it whole.")
@click.option("--context-length", default=256, show_default=True, type=int, help="Tokens per window.")
@click.option(
    "--max-tokens", default=None, type=COUNT, help="Stop after this many tokens, e.g. 100k (default: all the text)."
)
@click.option(
    "--batch-windows", "--batch-size", default=8, show_default=True, type=int, help="Windows per forward pass."
)
@click.option("--layers", "layers_text", default="all", show_default=True, help="all, or blocks like 0,2,5 or 0-29.")
@click.option(
    "--dtype",
    default="float16",
    show_default=True,
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Storage dtype of the activations.",
)
@click.option(
    "--compute-dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="Model dtype: auto is float32 on CPU, bfloat16 on CUDA.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace a cache made with other settings.")
@click.option("--chunk-tokens", default=4096, show_default=True, type=COUNT, help="Token rows per stored chunk.")
@click.option("--model-cache", default=None, type=click.Path(path_type=Path), help="Where embedded models convert to.")
@click.option("--num-shards", default=1, show_default=True, type=int, help="Split the tokens between N workers.")
@click.option("--shard-index", default=0, show_default=True, type=int, help="Which shard this worker writes (0..N-1).")
@click.option(
    "--direct-io/--no-direct-io",
    default=True,
    show_default=True,
    help="Write full activation chunks with O_DIRECT where the file system allows (the same bytes either way).",
)
@click.option("--dry-run", is_flag=True, help="Print the plan (size, free space) and write nothing.")
@click.pass_context
def harvest(ctx: click.Context, out: Path, layers_text: str, **options: object) -> None:
    """Store the residual stream after every selected block for the tokens of a text, in OUT. Re-running the same
    command resumes an interrupted harvest, a larger --max-tokens extends a complete one."""
    from mlsae_cache.harvest import run_harvest

    silence_library_progress()
    cfg = HarvestConfig(out=out, layers=parse_layers(layers_text), **options)  # type: ignore[arg-type]
    started = time.monotonic()
    with progress(ctx, "harvest", "token") as advance:
        result = run_harvest(cfg, advance, on_plan=lambda plan: click.echo(plan.describe()))
    click.echo(result.message)
    if result.complete and not result.noop:
        click.echo(done_line(out, started, f"mlsae-train fit {out} SAE_DIR"))


@main.command(name="import")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--activations", required=True, type=click.Path(path_type=Path), help="(token, layer, d_model) .npy.")
@click.option("--token-ids", default=None, type=click.Path(path_type=Path), help="(token,) .npy of token ids.")
@click.option("--context-length", default=None, type=int, help="Tokens per window (default: one window).")
@click.option("--dtype", default=None, type=click.Choice(["float16", "bfloat16", "float32"]), help="Storage dtype.")
@click.option("--chunk-tokens", default=4096, show_default=True, type=COUNT, help="Token rows per stored chunk.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at OUT.")
@click.pass_context
def import_(ctx: click.Context, out: Path, **options: object) -> None:
    """Wrap an existing activations array as a cache in OUT (every row trainable)."""
    from mlsae_cache.importer import ImportConfig, import_array

    cfg = ImportConfig(out=out, **options)  # type: ignore[arg-type]
    started = time.monotonic()
    with progress(ctx, "import", "token") as advance:
        meta = import_array(cfg, progress=advance)
    click.echo(f"wrote {out}: {meta.n_tokens:,} tokens x {meta.n_layers} layers x {meta.d_model}")
    click.echo(done_line(out, started, f"mlsae-train fit {out} SAE_DIR"))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(path: Path, as_json: bool) -> None:
    """Show what the cache at PATH holds: model, dataset, tokens, layers, size, completeness."""
    facts = cache_info(path)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    size, tokens = facts["bytes_on_disk"], facts["tokens"]
    facts["bytes_on_disk"] = f"{int(size) / 1e6:.1f} MB ({int(size) / max(int(tokens), 1) / 1e3:.1f} KB/token)"
    layers = facts["layers"]
    facts["layers"] = f"{len(layers)} ({layers[0]}..{layers[-1]})" if len(layers) > 3 else str(layers)
    width = max(map(len, facts))
    for key, value in facts.items():
        click.echo(f"{key:<{width}}  {value}")


@main.command(name="verify")
@click.argument("path", type=click.Path(path_type=Path))
def verify_(path: Path) -> None:
    """Check every file of the store at PATH against its checksums: a cache, latents store, variance output,
    explorer index, SAE checkpoint or lens. Exit 1 naming the first damaged file."""
    result = verify_path(path)
    click.echo(f"{path}: {result.kind}, {result.checked} {result.unit} verified")
    for note in result.notes:
        click.echo(f"note: {note}")
