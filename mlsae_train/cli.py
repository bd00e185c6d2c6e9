"""`mlsae-train`: fit a multi-layer TopK SAE on a cache, evaluate it, convert published checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from mlsae_cache.config import parse_layers
from mlsae_cache.core.cli import flags, mlsae_group, progress_bar, silence_library_progress
from mlsae_train.results import CompareResult, EvalResult


@mlsae_group
def main() -> None:
    """Train one TopK sparse autoencoder on the residual stream of every layer, from a cache."""


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--expansion-factor", default=64, show_default=True, type=int, help="n_latents = R * d_model.")
@click.option("--k", default=32, show_default=True, type=int, help="Latents kept per row.")
@click.option("--batch-rows", default=4096, show_default=True, type=int, help="(token, layer) rows per step.")
@click.option("--lr", default=1e-4, show_default=True, type=float, help="Adam learning rate.")
@click.option("--max-rows", default=None, type=int, help="Rows to train on (default: one epoch).")
@click.option("--layers", "layers_text", default="all", show_default=True, help="all, or block indices like 0,2,5.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the initial weights and the row order.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint.")
@click.option("--no-standardize", "standardize", flag_value=False, default=True, help="Skip per-row standardisation.")
@click.option("--dead-after-rows", default=10_000_000, show_default=True, type=int, help="Rows inactive = dead.")
@click.option("--k-aux", default=256, show_default=True, type=int, help="AuxK latents (0 turns AuxK off).")
@click.option(
    "--autocast",
    default="none",
    show_default=True,
    type=click.Choice(["none", "bf16"]),
    help="bf16 for the encoder matmul.",
)
@click.option(
    "--decoder-kernel",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "triton", "eager"]),
    help="Sparse decoder: auto is Triton on CUDA when installed, eager otherwise.",
)
@click.option(
    "--checkpoint-every-rows", default=1_000_000, show_default=True, type=int, help="Rows between checkpoints."
)
@click.option("--log-every-steps", default=10, show_default=True, type=int, help="Steps between metrics lines.")
@click.option("--block-units", default=32, show_default=True, type=int, help="Stored chunks shuffled together.")
@click.option("--train-tokens", default=None, type=int, help="Train on the first N tokens only (hold out the rest).")
@click.option(
    "--reuse-buffers/--no-reuse-buffers",
    default=True,
    show_default=True,
    help="Refill the loader's block buffers instead of allocating fresh ones (the same batches either way).",
)
@click.pass_context
def fit(ctx: click.Context, cache: Path, out: Path, layers_text: str, **options: Any) -> None:
    """Train an SAE on the rows of CACHE; write cfg.json, sae.safetensors, metrics.jsonl in OUT.

    Under `torchrun --nproc_per_node N`, trains data-parallel on N processes (--batch-rows stays the global batch).
    """
    from mlsae_train.config import TrainConfig
    from mlsae_train.distributed import is_main_process
    from mlsae_train.trainer import fit as run_fit

    cfg = TrainConfig(cache=cache, out=out, layers=parse_layers(layers_text), **options)
    reports = is_main_process()  # under torchrun, rank 0 alone shows progress and the summary
    with progress_bar(None, "row", flags(ctx)["quiet"] or not reports, "fit") as advance:
        result = run_fit(cfg, progress=lambda n, line: advance(n))
    if not reports:
        return
    final = result.final
    if not final:  # a resumed run that had already reached its target took no step
        click.echo(f"{out} is already trained ({result.steps} steps, {result.rows} rows); nothing to do")
        return
    click.echo(
        f"wrote {out}: {result.steps} steps, {result.rows} rows; FVU {final.get('fvu', float('nan')):.4f}, "
        f"L0 {final.get('l0', float('nan')):.1f}, dead {final.get('dead_fraction', float('nan')):.3f}"
    )


def format_eval(result: EvalResult) -> str:
    """The per-layer table of `eval`, with delta CE and KL columns when the result has them (--splice)."""
    n = len(result.layer)
    delta_ce: Sequence[float | None] = result.delta_ce or [None] * n
    kl: Sequence[float | None] = result.kl or [None] * n
    header = f"{'layer':>5}  {'FVU':>8}  {'MSE':>10}  {'L0':>6}  {'rows':>8}"
    lines = [header + ("  dCE(nats)  KL(nats)" if result.spliced else "")]
    for i, (layer, mse, l0, rows, dce, div) in enumerate(
        zip(result.layer, result.mse, result.l0, result.n_rows, delta_ce, kl, strict=True)
    ):
        line = f"{layer:>5}  {result.fvu_value(i):>8.4f}  {mse:>10.4g}  {l0:>6.1f}  {rows:>8}"
        lines.append(line + (f"  {dce:>9.4f}  {div:>8.4f}" if result.spliced else ""))
    lines.append(f"mean FVU {result.fvu_mean:.4f}; dead fraction {result.dead_fraction:.4f}")
    if result.spliced:
        lines.append(
            f"clean CE {result.clean_ce:.4f} nats/token; mean delta CE {result.delta_ce_mean:.4f}, "
            f"mean KL {result.kl_mean:.4f} over {result.n_predicted} predictions in {result.n_windows} windows"
        )
    return "\n".join(lines)


def format_compare(result: CompareResult) -> str:
    """The comparison as aligned plain text."""
    header, cells = result.table()
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *cells]]
    if result.clean_ce is not None:
        lines.append(f"clean CE {result.clean_ce:.4f} nats/token over {result.n_windows} windows")
    return "\n".join(lines)


def splice_options(func: Any) -> Any:
    """The options of `SpliceConfig` shared by `eval --splice` and `compare --splice` (start/stop are separate)."""
    options = [
        click.option("--model", default=None, help="Model to splice into (default: the one the cache names)."),
        click.option(
            "--dataset", default=None, help="Fresh text for splicing (pydoc, FILE or hub id) instead of CACHE."
        ),
        click.option("--max-windows", default=None, type=int, help="Spliced context windows at most (default: all)."),
        click.option("--batch-windows", default=8, show_default=True, type=int, help="Windows per forward pass."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command(name="eval")
@click.argument("sae", type=click.Path(path_type=Path))
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", default=None, type=click.Path(path_type=Path), help="Write the metrics as JSON.")
@click.option("--start", default=0, show_default=True, type=int, help="First token of the evaluated range.")
@click.option("--stop", default=None, type=int, help="End of the evaluated token range (default: all).")
@click.option("--layers", "layers_text", default="all", show_default=True, help="Layers (default: the SAE's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--splice", "--model-splice", "splice", is_flag=True, help="Also delta CE and KL by splicing.")
@splice_options
@click.pass_context
def eval_(ctx: click.Context, layers_text: str, **options: Any) -> None:
    """Per-layer FVU, MSE, L0 and the dead fraction of SAE on the trainable rows of CACHE; with --splice, also
    delta CE and KL with the SAE spliced into the model at each layer (on whole windows of the same range)."""
    from mlsae_train.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(layers=parse_layers(layers_text), **options)
    if cfg.splice:
        silence_library_progress()
    quiet = flags(ctx)["quiet"]
    with (
        progress_bar(cfg.stop, "tok", quiet, "eval") as advance,
        progress_bar(cfg.max_windows, "window", quiet or not cfg.splice, "splice") as advance_windows,
    ):
        result = run_eval(cfg, progress=advance, splice_progress=advance_windows)
    click.echo(format_eval(result))
    if cfg.out is not None:
        click.echo(f"wrote {cfg.out}")


@main.command(name="convert-reference")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def convert_reference_(src: Path, out: Path) -> None:
    """Convert a published reference checkpoint (tim-lawson/mlsae-*) in SRC into our format in OUT."""
    from mlsae_train.checkpoint import convert_reference

    convert_reference(src, out)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("mlsae", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cache", required=True, type=click.Path(path_type=Path), help="Cache of the evaluation rows.")
@click.option("--single", "singles", multiple=True, help="LAYER=DIR: an SAE trained with fit --layers LAYER.")
@click.option("--splice", is_flag=True, help="Also delta CE and KL by splicing each SAE into the model.")
@click.option("--start", default=0, show_default=True, type=int, help="First token of the evaluated range.")
@click.option("--stop", default=None, type=int, help="End of the evaluated token range (default: all).")
@splice_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.pass_context
def compare(ctx: click.Context, mlsae: Path, out: Path, singles: tuple[str, ...], **options: Any) -> None:
    """Put the MLSAE beside single-layer SAEs, per layer (FVU, delta CE, KL, dead fraction); write
    OUT/compare.json (`mlsae-analyze report --compare` and `heatmap --compare` draw its table and figure)."""
    from mlsae_train.compare import CompareConfig, parse_single, run_compare

    cfg = CompareConfig(mlsae=mlsae, out=out, singles=tuple(parse_single(s) for s in singles), **options)
    silence_library_progress()
    with progress_bar(cfg.max_windows, "window", flags(ctx)["quiet"], "compare") as advance:
        result = run_compare(cfg, progress=advance)
    click.echo(format_compare(result))
    click.echo(f"wrote {out}/compare.json")
