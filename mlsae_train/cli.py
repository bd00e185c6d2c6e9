"""`mlsae-train`: fit a multi-layer TopK SAE on a cache, evaluate it, convert published checkpoints."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from mlsae_cache.config import parse_layers
from mlsae_cache.core.cli import COUNT, Values, mlsae_group, progress, silence_library_progress, stages
from mlsae_cache.core.progress import duration, no_progress
from mlsae_train.results import CompareResult, EvalResult

if TYPE_CHECKING:
    from mlsae_train.config import TrainConfig
    from mlsae_train.trainer import FitResult


@mlsae_group
def main() -> None:
    """Train one TopK sparse autoencoder on the residual stream of every layer, from a cache."""


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--expansion-factor", default=64, show_default=True, type=int, help="n_latents = R * d_model.")
@click.option("--k", default=32, show_default=True, type=int, help="Latents kept per row.")
@click.option("--batch-rows", default=4096, show_default=True, type=COUNT, help="(token, layer) rows per step.")
@click.option("--lr", default=1e-4, show_default=True, type=float, help="Adam learning rate.")
@click.option("--max-rows", default=None, type=COUNT, help="Rows to train on, e.g. 2M (default: one epoch).")
@click.option("--layers", "layers_text", default="all", show_default=True, help="all, or blocks like 0,2,5 or 0-29.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the initial weights and the row order.")
@click.option("--data-seed", default=None, type=int, help="Seed of the row order alone (default: --seed).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in OUT with its own settings (only --max-rows and the intervals may change).",
)
@click.option("--overwrite", is_flag=True, help="Replace a run of other settings in OUT.")
@click.option("--no-standardize", "standardize", flag_value=False, default=True, help="Skip per-row standardisation.")
@click.option(
    "--dead-after-rows", default=10_000_000, show_default=True, type=COUNT, help="Rows without firing = dead."
)
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
    "--checkpoint-every-rows", default=1_000_000, show_default=True, type=COUNT, help="Rows between checkpoints."
)
@click.option("--log-every-steps", default=10, show_default=True, type=int, help="Steps between metrics lines.")
@click.option("--block-units", default=32, show_default=True, type=int, help="Stored chunks shuffled together.")
@click.option("--train-tokens", default=None, type=COUNT, help="Train on the first N tokens only (hold out the rest).")
@click.option(
    "--loss-space",
    default="standardized",
    show_default=True,
    type=click.Choice(["standardized", "raw"]),
    help="Where the FVU loss is computed: on standardised rows, or in raw units (what eval reports).",
)
@click.option(
    "--reuse-buffers/--no-reuse-buffers",
    default=True,
    show_default=True,
    help="Refill the loader's block buffers instead of allocating fresh ones (the same batches either way).",
)
@click.option(
    "--lens",
    default=None,
    type=click.Path(path_type=Path),
    help="A tuned lens (mlsae-train lens): fit on lens-translated rows; OUT carries the lens.",
)
@click.pass_context
def fit(ctx: click.Context, layers_text: str, **options: Any) -> None:
    """Train an SAE on the rows of CACHE; write cfg.json, sae.safetensors, metrics.jsonl in OUT. Re-running the
    same command continues an unfinished run (a checkpoint is saved on Ctrl-C) and does nothing for a finished one.

    Under `torchrun --nproc_per_node N`, trains data-parallel on N processes (--batch-rows stays the global batch).
    """
    from mlsae_train.config import TrainConfig
    from mlsae_train.distributed import is_main_process
    from mlsae_train.outdir import resume_config
    from mlsae_train.trainer import fit as run_fit

    cfg = TrainConfig(layers=parse_layers(layers_text), **options)
    if cfg.resume:
        cfg = resume_config(cfg, given_options(ctx, {"layers_text": "layers"}))
    reports = is_main_process()  # under torchrun, rank 0 alone shows progress and the summary
    started = time.monotonic()
    with progress(ctx, "fit", "row") as advance:
        result = run_fit(cfg, progress=advance if reports else no_progress)
    if reports:
        click.echo(fit_summary(cfg, result, time.monotonic() - started))


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--expansion-factor", default="64", show_default=True, type=Values(int), help="R: one or more, e.g. 4,8.")
@click.option("--k", default="32", show_default=True, type=Values(int), help="Latents kept per row: one or more.")
@click.option("--lr", default="1e-4", show_default=True, type=Values(float), help="Learning rates: one or more.")
@click.option("--seed", default="0", show_default=True, type=Values(int), help="Seeds of the initial weights.")
@click.option("--data-seed", default=None, type=int, help="Seed of the shared row order (default: the first --seed).")
@click.pass_context
def sweep(ctx: click.Context, layers_text: str, **options: Any) -> None:
    """Train an SAE for every combination of the listed values on one pass over the rows of CACHE (each batch read
    once), each written to OUT/NAME (e.g. x8-k32-lr0.0001-seed0) as fit writes it, equal to the fit with those
    values and --data-seed. Re-running the same command continues every member and skips finished ones."""
    from mlsae_train.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(layers=parse_layers(layers_text), **options)
    with progress(ctx, "sweep", "row") as advance:
        result = run_sweep(cfg, progress=advance)
    click.echo(result.summary(cfg.cache))


# The rest of fit's options, as fit has them, after the sweep's own (the swept ones take lists; a re-run continues a
# sweep, which has no --resume) and before the options every command has.
_OWN = sum(p.expose_value for p in sweep.params)
sweep.params[_OWN:_OWN] = [
    copy.copy(p)
    for p in fit.params
    if isinstance(p, click.Option) and p.expose_value and p.name not in {p.name for p in sweep.params} | {"resume"}
]


def given_options(ctx: click.Context, renamed: dict[str, str]) -> set[str]:
    """The config fields set on the command line or by a preset (not left at their defaults)."""
    given = {ParameterSource.COMMANDLINE, ParameterSource.DEFAULT_MAP}
    return {renamed.get(name, name) for name in ctx.params if ctx.get_parameter_source(name) in given}


def fit_summary(cfg: TrainConfig, result: FitResult, seconds: float) -> str:
    """The final line of `fit`: what was written, how good it looks, how long it took, what to run next; flags
    numbers that cannot mean what they seem to."""
    out = cfg.out
    if result.noop:
        return f"{out} is already trained ({result.steps:,} steps, {result.rows:,} rows); nothing to do"
    final = result.final
    fvu, l0, dead = (final.get(k, float("nan")) for k in ("fvu", "l0", "dead_fraction"))
    notes = []
    if fvu > 1:
        notes.append(f"FVU {fvu:.3g} > 1: worse than predicting each layer's mean; train longer or lower --lr")
    if result.rows < cfg.dead_after_rows:
        notes.append(
            f"dead fraction not measurable: {result.rows:,} rows trained < --dead-after-rows {cfg.dead_after_rows:,} "
            "(no latent can be dead yet, so AuxK never acted; lower --dead-after-rows to fit the run)"
        )
    lines = [
        f"wrote {out}: {result.steps:,} steps, {result.rows:,} rows in {duration(seconds)}; FVU {fvu:.4f} (last "
        f"batch, {'lens space' if cfg.lens else 'raw units'}), L0 {l0:.1f}, dead {dead:.3f}",
        *(f"note: {n}" for n in notes),
        f"next: mlsae-train eval {out} {cfg.cache}  (held-out FVU), or mlsae-analyze encode {out} {cfg.cache} LATENTS",
    ]
    return "\n".join(lines)


def format_eval(result: EvalResult) -> str:
    """The per-layer table of `eval`, with delta CE and both KL columns when the result has them (--splice)."""
    n = len(result.layer)
    spliced = [result.delta_ce, result.kl, result.kl_spliced_clean]
    columns: list[Sequence[float | None]] = [c or [None] * n for c in spliced]
    header = f"{'layer':>5}  {'FVU':>8}  {'MSE':>10}  {'L0':>6}  {'rows':>8}"
    header += "  FVU(lens)" if result.fvu_lens is not None else ""
    lines = [header + ("  dCE(nats)  KL(c||s)  KL(s||c)" if result.spliced else "")]
    for i, (layer, mse, l0, rows, dce, kl, reverse) in enumerate(
        zip(result.layer, result.mse, result.l0, result.n_rows, *columns, strict=True)
    ):
        line = f"{layer:>5}  {result.fvu_value(i):>8.4f}  {mse:>10.4g}  {l0:>6.1f}  {rows:>8}"
        line += f"  {result.fvu_lens[i] or math.nan:>9.4f}" if result.fvu_lens is not None else ""
        lines.append(line + (f"  {dce:>9.4f}  {kl:>8.4f}  {reverse or 0.0:>8.4f}" if result.spliced else ""))
    lines.append(f"mean FVU {result.fvu_mean:.4f}; dead fraction {result.dead_fraction:.4f}; {result.token_range()}")
    if result.fvu_lens_mean is not None:
        lines.append(f"mean FVU in the lens space {result.fvu_lens_mean:.4f} (FVU and MSE above: raw units)")
    if result.spliced:
        lines.append(
            f"clean CE {result.clean_ce:.4f} nats/token; mean delta CE {result.delta_ce_mean:.4f}, mean KL(clean || "
            f"spliced) {result.kl_mean:.4f}, mean KL(spliced || clean) {result.kl_spliced_clean_mean or 0.0:.4f}, per "
            f"token over {result.n_predicted} predictions in {result.n_windows} windows"
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
@click.argument("sae")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", default=None, type=click.Path(path_type=Path), help="Write the metrics as JSON.")
@click.option(
    "--start", default=None, type=COUNT, help="First token evaluated (default: the first one the fit held out)."
)
@click.option("--stop", default=None, type=COUNT, help="End of the evaluated token range (default: all).")
@click.option("--layers", "layers_text", default="all", show_default=True, help="Layers (default: the SAE's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--splice", "--model-splice", "splice", is_flag=True, help="Also delta CE and KL by splicing.")
@splice_options
@click.option("--allow-unfinished", is_flag=True, help="Use an SAE checkpoint whose fit has not finished.")
@click.pass_context
def eval_(ctx: click.Context, layers_text: str, **options: Any) -> None:
    """Per-layer FVU, MSE, L0 and the dead fraction of SAE on the trainable rows of CACHE; with --splice, also
    delta CE and KL with the SAE spliced into the model at each layer (on whole windows of the same range)."""
    from mlsae_train.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(layers=parse_layers(layers_text), **options)
    if cfg.splice:
        silence_library_progress()
    with stages(ctx) as shown:
        result = run_eval(cfg, shown.stage("eval", "token"), shown.stage("splice", "window", cfg.max_windows))
    click.echo(format_eval(result))
    if cfg.out is not None:
        click.echo(f"wrote {cfg.out}")


@main.command(name="convert-reference")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def convert_reference_(src: Path, out: Path) -> None:
    """Convert a published reference checkpoint (tim-lawson/mlsae-*) in SRC into our format in OUT (the same as
    `import-sae SRC OUT --from reference`)."""
    from mlsae_train.checkpoint import convert_reference

    convert_reference(src, out)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("sae")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--format", default="saelens", show_default=True, type=click.Choice(["saelens", "sparsify"]), help="Folder layout."
)
@click.option("--layers", "layers_text", default="all", show_default=True, help="Layers to export (default: all).")
@click.option("--cache", default=None, type=click.Path(path_type=Path), help="The SAE's cache, for the metadata.")
@click.option("--allow-unfinished", is_flag=True, help="Use an SAE checkpoint whose fit has not finished.")
@click.option("--overwrite", is_flag=True, help="Replace an export made from another SAE.")
def export(layers_text: str, **options: Any) -> None:
    """Write SAE (a directory or a hub id) as one folder per layer that SAELens (`SAE.load_from_disk`) or sparsify
    (`SparseCoder.load_from_disk`, only for SAEs trained with --no-standardize) loads."""
    from mlsae_train.interop.exchange import ExportConfig, run_export

    folders = run_export(ExportConfig(layers=parse_layers(layers_text), **options))
    click.echo(f"wrote {len(folders)} folders in {options['out']} ({folders[0].name}, ...)")


@main.command(name="import-sae")
@click.argument("src")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--from",
    "source",
    default="saelens",
    show_default=True,
    type=click.Choice(["saelens", "sparsify", "reference"]),
    help="The tool SRC (a folder or a hub id) comes from.",
)
@click.option("--overwrite", is_flag=True, help="Replace what OUT holds.")
def import_sae(**options: Any) -> None:
    """Convert a TopK SAE of SAELens, sparsify or the reference code into our format in OUT (what it cannot
    express is refused)."""
    from mlsae_train.interop.exchange import ImportSaeConfig, run_import

    click.echo(f"wrote {run_import(ImportSaeConfig(**options))}")


@main.command()
@click.argument("sae")
@click.argument("repo")
@click.option("--eval", default=None, type=click.Path(path_type=Path), help="eval.json to upload and tabulate.")
@click.option("--cache", default=None, type=click.Path(path_type=Path), help="The SAE's cache, for the model card.")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--message", default="Upload an mlsae SAE", show_default=True, help="Commit message.")
@click.option(
    "--to-folder", default=None, type=click.Path(path_type=Path), help="Write the files here; upload nothing."
)
@click.option("--allow-unfinished", is_flag=True, help="Use an SAE checkpoint whose fit has not finished.")
def push(**options: Any) -> None:
    """Upload SAE to the Hugging Face Hub repository REPO (owner/name[/subfolder][@revision]): the weights, cfg.json
    without local paths, the eval table and a model card; never the trainer state."""
    from mlsae_train.interop.push import PushConfig, run_push

    cfg = PushConfig(**options)
    files = run_push(cfg)
    where = cfg.to_folder if cfg.to_folder is not None else f"hf://{cfg.repo}"
    click.echo(f"wrote {', '.join(files)} to {where}")


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
@click.option("--allow-unfinished", is_flag=True, help="Use an SAE checkpoint whose fit has not finished.")
@click.option("--overwrite", is_flag=True, help="Replace a comparison made from other inputs.")
@click.pass_context
def compare(ctx: click.Context, mlsae: Path, out: Path, singles: tuple[str, ...], **options: Any) -> None:
    """Put the MLSAE beside single-layer SAEs, per layer (FVU, delta CE, KL, dead fraction); write
    OUT/compare.json (`mlsae-analyze report --compare` and `heatmap --compare` draw its table and figure)."""
    from mlsae_train.compare import CompareConfig, parse_single, run_compare

    cfg = CompareConfig(mlsae=mlsae, out=out, singles=tuple(parse_single(s) for s in singles), **options)
    silence_library_progress()
    with stages(ctx) as shown:
        splice = shown.stage("splice", "window", cfg.max_windows)
        result = run_compare(cfg, shown.stage("compare", "token"), splice)
    click.echo(format_compare(result))
    click.echo(f"wrote {out}/compare.json")


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="Model whose final norm and LM head to use (default: the cache's).")
@click.option("--epochs", default=8, show_default=True, type=int, help="Passes over the training tokens.")
@click.option("--max-tokens", default=None, type=COUNT, help="Tokens to train on in all (instead of --epochs).")
@click.option("--batch-tokens", default=512, show_default=True, type=COUNT, help="Tokens per step (all layers).")
@click.option("--lr", default=1e-2, show_default=True, type=float, help="Adam learning rate.")
@click.option("--train-tokens", default=None, type=COUNT, help="Train on the first N tokens only (hold out the rest).")
@click.option("--block-chunks", default=2, show_default=True, type=int, help="Cache chunks shuffled together.")
@click.option("--chunk-rows", default=2048, show_default=True, type=COUNT, help="Rows per pass of the LM head.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the token order.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--autocast",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "bf16", "none"]),
    help="bf16 for the LM head's products (auto: where the device has it).",
)
@click.option("--checkpoint-every-steps", default=20, show_default=True, type=int, help="Steps between checkpoints.")
@click.option("--overwrite", is_flag=True, help="Replace a lens of other settings in OUT.")
@click.pass_context
def lens(ctx: click.Context, **options: Any) -> None:
    """Train a tuned lens on CACHE: one affine translator per stored block, fitted so that the model's final norm
    and LM head of the translated residual match the model's own final distribution; write it to OUT. Re-running
    the same command continues an interrupted run."""
    from mlsae_train.lens_train import LensConfig, run_lens

    cfg = LensConfig(**options)
    started = time.monotonic()
    with progress(ctx, "lens", "token") as advance:
        result = run_lens(cfg, progress=advance)
    if result.noop:
        click.echo(f"{cfg.out} is already trained ({result.steps:,} steps, {result.tokens:,} tokens); nothing to do")
        return
    kl = ", ".join(f"{v:.3f}" for v in result.kl)
    click.echo(
        f"wrote {cfg.out}: {result.steps:,} steps, {result.tokens:,} tokens in {duration(time.monotonic() - started)};"
        f" last batch KL per layer {kl}\nnext: mlsae-train eval-lens {cfg.out} {cfg.cache} --out DIR, or "
        f"mlsae-train fit {cfg.cache} SAE --lens {cfg.out}"
    )


@main.command(name="eval-lens")
@click.argument("lens", type=click.Path(path_type=Path))
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", default=None, type=click.Path(path_type=Path), help="Write lens_eval.json and lens_kl.png.")
@click.option("--start", default=None, type=COUNT, help="First token (default: the first one the lens held out).")
@click.option("--stop", default=None, type=COUNT, help="End of the evaluated token range (default: all).")
@click.option("--model", default=None, help="Model whose final norm and LM head to use (default: the cache's).")
@click.option("--batch-tokens", default=256, show_default=True, type=COUNT, help="Tokens per pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--autocast",
    default="none",
    show_default=True,
    type=click.Choice(["auto", "bf16", "none"]),
    help="bf16 for the LM head's products (none: float32).",
)
@click.option("--overwrite", is_flag=True, help="Replace an OUT made from another lens or cache.")
@click.pass_context
def eval_lens(ctx: click.Context, **options: Any) -> None:
    """Per-layer KL(p_final || p_layer) of the tuned lens LENS and of the logit lens (identity) on held-out
    tokens of CACHE, as a table; with --out, also as JSON and a figure."""
    from mlsae_train.lens_eval import LensEvalConfig, run_eval_lens

    cfg = LensEvalConfig(**options)
    with progress(ctx, "eval-lens", "token") as advance:
        result = run_eval_lens(cfg, progress=advance)
    click.echo(result.table())
    if cfg.out is not None:
        click.echo(f"wrote {cfg.out}")


@main.command(name="import-lens")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cache", required=True, type=click.Path(path_type=Path), help="A cache of the lens's model.")
@click.option(
    "--indexing",
    default="shifted",
    show_default=True,
    type=click.Choice(["shifted", "reference"]),
    help="shifted: block l gets translator l+1 (the library's meaning); reference: translator l (the authors' code).",
)
@click.option("--overwrite", is_flag=True, help="Replace what OUT holds.")
def import_lens(**options: Any) -> None:
    """Convert a lens of the tuned-lens library (SRC: config.json + params.pt) into an mlsae lens in OUT, for the
    blocks of CACHE."""
    from mlsae_train.lens_import import ImportLensConfig
    from mlsae_train.lens_import import import_lens as run_import

    cfg = ImportLensConfig(**options)
    lens = run_import(cfg)
    click.echo(f"wrote {cfg.out}: translators of blocks {list(lens.layers)} ({cfg.indexing} indexing)")
