"""`mlsae-cache`: harvest, import, inspect and verify activation caches. A thin layer over the library."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlsae_cache.config import HarvestConfig, parse_layers
from mlsae_cache.core.cli import flags, mlsae_group, progress_bar, silence_library_progress
from mlsae_cache.info import cache_info
from mlsae_cache.store import verify


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
@click.option("--max-tokens", default=None, type=int, help="Stop after this many tokens (default: all the text).")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Windows per forward pass.")
@click.option("--layers", "layers_text", default="all", show_default=True, help="all, or block indices like 0,2,5.")
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
@click.option("--chunk-tokens", default=4096, show_default=True, type=int, help="Token rows per stored chunk.")
@click.option("--model-cache", default=None, type=click.Path(path_type=Path), help="Where embedded models convert to.")
@click.option("--num-shards", default=1, show_default=True, type=int, help="Split the tokens between N workers.")
@click.option("--shard-index", default=0, show_default=True, type=int, help="Which shard this worker writes (0..N-1).")
@click.option(
    "--direct-io/--no-direct-io",
    default=True,
    show_default=True,
    help="Write full activation chunks with O_DIRECT where the file system allows (the same bytes either way).",
)
@click.pass_context
def harvest(ctx: click.Context, out: Path, layers_text: str, **options: object) -> None:
    """Store the residual stream after every selected block for the tokens of a text, in OUT."""
    from mlsae_cache.harvest import run_harvest

    silence_library_progress()

    cfg = HarvestConfig(out=out, layers=parse_layers(layers_text), **options)  # type: ignore[arg-type]
    total = cfg.max_tokens and -(-cfg.max_tokens // cfg.num_shards)  # a shard: about its share
    with progress_bar(total, "tok", flags(ctx)["quiet"], "harvest") as advance:
        result = run_harvest(cfg, progress=advance)
    click.echo(result.message)


@main.command(name="import")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--activations", required=True, type=click.Path(path_type=Path), help="(token, layer, d_model) .npy.")
@click.option("--token-ids", default=None, type=click.Path(path_type=Path), help="(token,) .npy of token ids.")
@click.option("--context-length", default=None, type=int, help="Tokens per window (default: one window).")
@click.option("--dtype", default=None, type=click.Choice(["float16", "bfloat16", "float32"]), help="Storage dtype.")
@click.option("--chunk-tokens", default=4096, show_default=True, type=int, help="Token rows per stored chunk.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at OUT.")
@click.pass_context
def import_(ctx: click.Context, out: Path, **options: object) -> None:
    """Wrap an existing activations array as a cache in OUT (every row trainable)."""
    from mlsae_cache.importer import ImportConfig, import_array

    cfg = ImportConfig(out=out, **options)  # type: ignore[arg-type]
    with progress_bar(None, "tok", flags(ctx)["quiet"], "import") as advance:
        meta = import_array(cfg, progress=advance)
    click.echo(f"wrote {out}: {meta.n_tokens} tokens x {meta.n_layers} layers x {meta.d_model}")


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
    """Read and checksum every chunk of the cache at PATH; exit 1 naming the first bad chunk."""
    n = verify(path)
    click.echo(f"{path}: {n} chunks verified")
