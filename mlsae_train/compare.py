"""An MLSAE beside single-layer SAEs, layer by layer: FVU, delta CE, KL and dead fraction.

The single-layer SAEs are ordinary checkpoints trained with `mlsae-train fit --layers l` (one per layer, same
expansion factor and k as the MLSAE for a fair comparison; a mismatch is logged, not refused). Every metric
is computed on the same evaluation rows and windows for all SAEs: FVU and the dead fraction by `evaluate` on
the trainable rows of the cache's token range [start, stop), delta CE and KL (with `splice`) by
`splice_metrics` in one pass whose clean forward is shared by every SAE. The MLSAE's dead fraction is over
all its layers (one dictionary serves them all), so it is the same in every row; a single-layer SAE's is over
its own layer.

Output: OUT/compare.json, a `CompareResult` record (results.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import InputError
from mlsae_cache.core.outputs import check_replaceable, output_dir
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.store import Cache
from mlsae_train.checkpoint import load_sae
from mlsae_train.evaluate import evaluate
from mlsae_train.lens import Lens, has_lens, lens_of
from mlsae_train.results import COMPARE_JSON, CompareResult
from mlsae_train.sae import TopKSAE
from mlsae_train.splice import SpliceConfig, SpliceTarget, splice_targets

log = logging.getLogger(__name__)


def parse_single(text: str) -> tuple[int, Path]:
    """`L=DIR` -> (L, DIR): the checkpoint of an SAE trained on block L alone."""
    layer, sep, path = text.partition("=")
    try:
        if not sep or not path:
            raise ValueError(text)
        return int(layer), Path(path)
    except ValueError as e:
        raise InputError(f"--single {text!r} is not LAYER=DIR (e.g. --single 3=runs/sae-l3)") from e


@dataclass(frozen=True)
class CompareConfig:
    """Everything `mlsae-train compare` takes; CLI options map one-to-one onto these fields."""

    mlsae: Path
    out: Path
    cache: Path
    singles: tuple[tuple[int, Path], ...] = ()
    splice: bool = False
    model: str | None = None
    dataset: str | None = None
    start: int = 0
    stop: int | None = None
    max_windows: int | None = None
    batch_windows: int = 8
    device: str = "auto"
    allow_unfinished: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a device that cannot be used is refused before any work
        layers = [layer for layer, _ in self.singles]
        if len(set(layers)) != len(layers):
            raise InputError(f"--single names layers {layers}; give each layer at most once")
        self.splice_config().check_used(self.splice)  # also validates the range and window options

    def splice_config(self) -> SpliceConfig:
        return SpliceConfig(self.model, self.dataset, self.start, self.stop, self.max_windows, self.batch_windows)


def load_singles(
    cfg: CompareConfig, mlsae: TopKSAE, layers: tuple[int, ...], device: torch.device
) -> dict[int, TopKSAE]:
    """Layer -> single-layer SAE; each must have been trained on that layer, and the layer be the MLSAE's."""
    singles: dict[int, TopKSAE] = {}
    for layer, path in cfg.singles:
        if layer not in layers:
            raise InputError(f"--single {layer}={path}: layer {layer} is not one of the MLSAE's layers {list(layers)}")
        sae, sae_cfg = load_sae(path, device, cfg.allow_unfinished)
        if has_lens(sae_cfg):
            raise InputError(
                f"--single {layer}={path} was fitted on lens-translated rows; compare takes plain single-layer SAEs "
                "(fit them without --lens)"
            )
        trained = sae_cfg.get("layers")
        if trained is not None and list(trained) != [layer]:
            raise InputError(f"--single {layer}={path} was trained on layers {trained}, not [{layer}] (fit --layers)")
        if (sae.cfg.n_latents, sae.cfg.k) != (mlsae.cfg.n_latents, mlsae.cfg.k):
            log.warning(
                "%s has n_latents %d and k %d but the MLSAE has %d and %d: the comparison is not like for like",
                path,
                sae.cfg.n_latents,
                sae.cfg.k,
                mlsae.cfg.n_latents,
                mlsae.cfg.k,
            )
        singles[layer] = sae
    return singles


def _fvu_dead(
    sae: TopKSAE,
    cache: Cache,
    layers: tuple[int, ...],
    cfg: CompareConfig,
    progress: Progress,
    lens: Lens | None = None,
) -> dict[int, dict]:
    result = evaluate(sae, cache, layers, cfg.start, cfg.stop, progress=lambda n, /, **facts: progress(n), lens=lens)
    return {
        layer: {"fvu": fvu, "dead_fraction": result.dead_fraction}
        for layer, fvu in zip(layers, result.fvu, strict=True)
    }


def run_compare(
    cfg: CompareConfig, progress: Progress = no_progress, splice_progress: Progress = no_progress
) -> CompareResult:
    """Compute the comparison and write it to cfg.out/compare.json (`mlsae-analyze report --compare` and
    `mlsae-analyze heatmap --compare` draw its table and figure). `progress` gets the tokens each SAE has
    evaluated (its total: the range's tokens times the SAEs), `splice_progress` the windows spliced."""
    check_replaceable(Path(cfg.out), "compare", _inputs(cfg), cfg.overwrite)  # before any work
    device = resolve_device(cfg.device)
    mlsae, mlsae_cfg = load_sae(cfg.mlsae, device, cfg.allow_unfinished)
    cache = Cache(cfg.cache)
    layers = tuple(mlsae_cfg.get("layers") or cache.layers)
    singles = load_singles(cfg, mlsae, layers, device)
    lens = lens_of(cfg.mlsae, mlsae_cfg, device)  # the MLSAE's own lens, if it was fitted with one
    lens = lens.select(layers) if lens is not None else None
    start, stop = cache.token_range(cfg.start, cfg.stop)
    progress(0, total=max(stop - start, 0) * (1 + len(singles)))
    metrics = {"mlsae": _fvu_dead(mlsae, cache, layers, cfg, progress, lens), "single": {}}
    for layer, sae in singles.items():
        metrics["single"].update(_fvu_dead(sae, cache, (layer,), cfg, progress))
    clean_ce = n_windows = None
    if cfg.splice:
        keys = [("mlsae", layer) for layer in layers] + [("single", layer) for layer in singles]
        targets = [
            SpliceTarget(layer, mlsae, lens.select((layer,)) if lens else None)
            if kind == "mlsae"
            else SpliceTarget(layer, singles[layer])
            for kind, layer in keys
        ]
        spliced = splice_targets(cache, targets, cfg.splice_config(), device, progress=splice_progress)
        columns = zip(keys, spliced.delta_ce, spliced.kl, spliced.kl_spliced_clean, strict=True)
        for (kind, layer), dce, kl, reverse in columns:
            metrics[kind][layer].update(
                {"delta_ce": dce, "kl": kl, "kl_clean_spliced": kl, "kl_spliced_clean": reverse}
            )
        clean_ce, n_windows = spliced.clean_ce, spliced.n_windows
    rows = [
        {"layer": layer, "mlsae": metrics["mlsae"][layer], "single": metrics["single"].get(layer)} for layer in layers
    ]
    sources = {"mlsae": str(cfg.mlsae), "single": {str(k): str(v) for k, v in cfg.singles}, "cache": str(cfg.cache)}
    result = CompareResult(rows, clean_ce, n_windows, sources)
    with output_dir(Path(cfg.out), "compare", _inputs(cfg), cfg.overwrite) as tmp:
        result.write(tmp / COMPARE_JSON)
    return result


def _inputs(cfg: CompareConfig) -> dict[str, Any]:
    """What a comparison is made from: the SAEs and the cache (resolved paths)."""
    return {
        "mlsae": str(Path(cfg.mlsae).resolve()),
        "cache": str(Path(cfg.cache).resolve()),
        "singles": [[layer, str(Path(path).resolve())] for layer, path in cfg.singles],
    }
