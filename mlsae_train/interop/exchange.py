"""The commands that move SAEs between mlsae and other tools: `export` (SAELens or sparsify folders, one per layer),
`import-sae` (a SAELens, sparsify or reference checkpoint into our format) and `push` (to the Hugging Face Hub)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsae_cache.core.errors import InputError
from mlsae_cache.core.outputs import output_dir
from mlsae_train.checkpoint import convert_reference, load_sae, resolve_sae, save_sae
from mlsae_train.interop import saelens, sparsify
from mlsae_train.interop.provenance import provenance
from mlsae_train.lens import has_lens

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("saelens", "sparsify")
IMPORT_FORMATS = ("saelens", "sparsify", "reference")


@dataclass(frozen=True)
class ExportConfig:
    """Everything `mlsae-train export` takes; CLI options map one-to-one onto these fields."""

    sae: str | Path
    out: Path
    format: str = "saelens"
    layers: tuple[int, ...] | None = None
    cache: Path | None = None
    allow_unfinished: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise InputError(f"--format {self.format!r} is not one of {', '.join(EXPORT_FORMATS)}")


def run_export(cfg: ExportConfig) -> list[Path]:
    """Write one folder per layer of cfg.sae into cfg.out in cfg.format (all at once); returns the folders."""
    sae, sae_cfg = load_sae(cfg.sae, "cpu", cfg.allow_unfinished)
    if has_lens(sae_cfg):
        raise InputError(
            f"SAE {cfg.sae} was fitted on tuned-lens translated rows, which {cfg.format} cannot express (it encodes "
            "the raw residual stream); export an SAE fitted without --lens"
        )
    prov = provenance(sae_cfg, cfg.cache)
    layers = cfg.layers if cfg.layers is not None else prov.layers
    if not layers:
        raise InputError(
            f"SAE {cfg.sae} records no layers (pass --layers, or --cache with the cache it was trained on)"
        )
    unknown = sorted(set(layers) - set(prov.layers)) if prov.layers else []
    if unknown:
        raise InputError(f"--layers {unknown} are not layers SAE {cfg.sae} was trained on ({list(prov.layers)})")
    if cfg.format == "sparsify":
        sparsify.check_exportable(sae, str(cfg.sae))
    if prov.policy.get("exclude_position_0", True) or prov.policy.get("exclude_special_tokens", True):
        log.info("note: the SAE was trained on trainable rows only; other tools encode every position")
    inputs = {"sae": str(resolve_sae(cfg.sae).resolve()), "format": cfg.format}
    with output_dir(Path(cfg.out), "export", inputs, cfg.overwrite) as tmp:
        for layer in sorted(layers):
            if cfg.format == "saelens":
                saelens.write_saelens(sae, layer, prov, tmp)
            else:
                sparsify.write_sparsify(sae, layer, tmp)
    names = [saelens.hook_name(lay) if cfg.format == "saelens" else sparsify.hookpoint(lay) for lay in sorted(layers)]
    return [Path(cfg.out) / name for name in names]


@dataclass(frozen=True)
class ImportSaeConfig:
    """Everything `mlsae-train import-sae` takes; CLI options map one-to-one onto these fields."""

    src: str | Path
    out: Path
    source: str = "saelens"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.source not in IMPORT_FORMATS:
            raise InputError(f"--from {self.source!r} is not one of {', '.join(IMPORT_FORMATS)}")


def _clear(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT {out} is a file (choose a directory for the SAE)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"OUT {out} is not empty (choose another OUT, or pass --overwrite to replace it)")
        shutil.rmtree(out)


def run_import(cfg: ImportSaeConfig) -> Path:
    """Convert the SAE in cfg.src (a folder or a hub id) into our format at cfg.out; returns cfg.out."""
    src = resolve_sae(cfg.src)
    readers = {"saelens": saelens.read_saelens, "sparsify": sparsify.read_sparsify}
    imported = None if cfg.source == "reference" else readers[cfg.source](src)  # refused before OUT is touched
    out = Path(cfg.out)
    if imported is None:
        if not cfg.overwrite:
            _clear(out, overwrite=False)  # refused before converting, not after
        beside = out.parent / f".{out.name}.import"
        shutil.rmtree(beside, ignore_errors=True)
        try:
            convert_reference(src, beside)  # refused here leaves OUT as it was
            _clear(out, cfg.overwrite)
            beside.rename(out)
        finally:
            shutil.rmtree(beside, ignore_errors=True)
        return out
    _clear(out, cfg.overwrite)
    sae, extra = imported
    record: dict[str, Any] = {**extra, "imported_from": {"format": cfg.source, "source": str(cfg.src)}}
    return save_sae(sae, cfg.out, record)
