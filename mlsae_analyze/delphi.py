"""`mlsae-analyze export-delphi LATENTS OUT`: a latents store in delphi's latent cache layout, so that delphi
(EleutherAI's automated interpretability) explains and scores our latents without running the SAE again.

OUT/latents/<module>/ holds, per range of latents [start, end], `<start>_<end>.safetensors` with `locations` [N, 3]
(window, position in the window, latent - start), `activations` [N] and the windows' `tokens` [windows, context],
and a `config.json` (context length, dataset, model name). Per layer (default) the modules are `layers.<l>`, the
hookpoint names of sparsify and delphi; pooled (`--pooled`) there is one module, `layers`, over every (layer,
window) pair: window w of layer index j is row w * n_layers + j of its `tokens`. Rows that are not trainable (special
tokens, position 0) are left out unless asked, as in every statistic of ours. Only whole windows are exported.
The export is held in memory before it is written (about 16 bytes per active latent).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors.numpy import save_file

from mlsae_analyze.latents import LatentChunk, Latents
from mlsae_cache.core.errors import InputError, MlsaeError, StoreError
from mlsae_cache.core.outputs import follow_umask, output_dir
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.store import read_meta

log = logging.getLogger(__name__)

LATENTS_DIR = "latents"
CONFIG_NAME = "config.json"
POOLED_MODULE = "layers"


@dataclass(frozen=True)
class DelphiConfig:
    """Everything `mlsae-analyze export-delphi` takes; CLI options map one-to-one onto these fields."""

    latents: Path
    out: Path
    per_layer: bool = True
    n_splits: int = 5
    cache: Path | None = None
    include_untrainable: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.n_splits < 1:
            raise InputError(f"--n-splits must be at least 1, got {self.n_splits}")


class DelphiExport(NamedTuple):
    """What an export wrote: module names, whole windows, context length, (row, layer, latent) locations."""

    modules: list[str]
    n_windows: int
    context: int
    n_locations: int


def module_name(layer: int) -> str:
    """delphi's (and sparsify's) hookpoint name of the residual stream after block `layer`."""
    return f"layers.{layer}"


def _context(latents: Latents) -> tuple[int, np.ndarray]:
    """The window length and the token ids of the whole windows [windows, context], checked against `position`."""
    rows = latents.tokens()
    starts = np.flatnonzero(rows.position == 0)
    if len(starts) == 0 or starts[0] != 0:
        raise StoreError(f"{latents.path} does not start at a window's first token (re-encode the whole cache)")
    context = int(rows.position.max()) + 1
    n_windows = len(rows.position) // context
    whole = n_windows * context
    if not np.array_equal(rows.position[:whole], np.tile(np.arange(context), n_windows)):
        raise StoreError(f"{latents.path} holds windows of different lengths, which delphi cannot read")
    if whole < latents.n_tokens:
        log.warning("left out the last %d tokens: an incomplete window", latents.n_tokens - whole)
    return context, rows.token_ids[:whole].astype(np.int64).reshape(n_windows, context)


def _chunk_locations(chunk: LatentChunk, context: int, whole: int, cfg: DelphiConfig) -> list[np.ndarray]:
    """Per layer index j: the active (window, position, latent, j) of the chunk's rows below `whole`, and values."""
    rows = np.arange(chunk.start, chunk.start + len(chunk.indices))
    keep = rows < whole
    if not cfg.include_untrainable:
        keep &= chunk.tokens.trainable
    found = []
    for j in range(chunk.indices.shape[1]):
        r, slot = np.nonzero((chunk.values[:, j, :] > 0) & keep[:, None])
        found.append(
            np.stack([rows[r] // context, rows[r] % context, chunk.indices[r, j, slot]], axis=1).astype(np.int64)
        )
        found.append(chunk.values[r, j, slot].astype(np.float32))
    return found


def _collect(latents: Latents, context: int, whole: int, cfg: DelphiConfig, progress: Progress) -> dict[str, Any]:
    """Module -> (locations [N, 3] int64, activations [N]) over every chunk."""
    n_layers = len(latents.layers)
    names = [module_name(layer) for layer in latents.layers] if cfg.per_layer else [POOLED_MODULE]
    empty = (np.zeros((0, 3), np.int64), np.zeros(0, np.float32))
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [empty] for name in names}
    for chunk in latents.chunks(progress):
        if chunk.start >= whole:
            break
        found = _chunk_locations(chunk, context, whole, cfg)
        for j, layer in enumerate(latents.layers):
            loc, act = found[2 * j], found[2 * j + 1]
            if cfg.per_layer:
                parts[module_name(layer)].append((loc, act))
            else:
                pooled = np.column_stack([loc[:, 0] * n_layers + j, loc[:, 1:]])
                parts[POOLED_MODULE].append((pooled, act))
    return {m: (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps])) for m, ps in parts.items()}


def _module_config(latents: Latents, cfg: DelphiConfig, context: int, n_windows: int) -> dict[str, Any]:
    where = cfg.cache if cfg.cache is not None else latents.meta.cache_path
    try:
        meta = read_meta(where)
        model, dataset = meta.model.get("name"), meta.dataset
    except MlsaeError as e:
        if cfg.cache is not None:
            raise
        log.warning("the latents' cache %s cannot be read (%s): no model name or dataset recorded", where, e)
        model, dataset = None, {}
    return {
        "dataset_repo": dataset.get("dataset"),
        "dataset_split": dataset.get("split", "train"),
        "dataset_name": dataset.get("config") or "",
        "dataset_column": dataset.get("text_column", "text"),
        "cache_ctx_len": context,
        "n_tokens": n_windows * context,
        "n_splits": cfg.n_splits,
        "model_name": model,
        "mlsae_layers": list(latents.layers),
        "mlsae_pooled_rows": None if cfg.per_layer else "window * n_layers + layer index",
        "mlsae_trainable_only": not cfg.include_untrainable,
    }


def _write_module(folder: Path, loc: np.ndarray, act: np.ndarray, tokens: np.ndarray, bounds: np.ndarray) -> None:
    folder.mkdir(parents=True)
    split = np.searchsorted(bounds, loc[:, 2], side="right") - 1
    for s in range(len(bounds) - 1):
        start, end = int(bounds[s]), int(bounds[s + 1]) - 1
        mine = loc[split == s].copy()
        mine[:, 2] -= start
        small = mine.size == 0 or int(mine.max()) < 2**16
        data = {
            "locations": mine.astype(np.uint16 if small else np.uint32),
            "activations": act[split == s],
            "tokens": tokens,
        }
        save_file(data, str(folder / f"{start}_{end}.safetensors"))
        follow_umask(folder / f"{start}_{end}.safetensors")


def run_export_delphi(cfg: DelphiConfig, progress: Progress = no_progress) -> DelphiExport:
    """Write cfg.latents in delphi's latent cache layout under cfg.out/latents (all at once); `progress` gets the
    tokens read."""
    latents = Latents(cfg.latents)
    context, tokens = _context(latents)
    n_windows = len(tokens)
    whole = n_windows * context
    progress(0, total=whole)
    modules = _collect(latents, context, whole, cfg, progress)
    bounds = np.linspace(0, latents.n_latents, min(cfg.n_splits, latents.n_latents) + 1).astype(np.int64)
    n_layers = len(latents.layers)
    config = _module_config(latents, cfg, context, n_windows)
    inputs = {"latents": str(Path(cfg.latents).resolve())}
    with output_dir(Path(cfg.out), "export-delphi", inputs, cfg.overwrite) as tmp:
        for name, (loc, act) in modules.items():
            rows = tokens if cfg.per_layer else np.repeat(tokens, n_layers, axis=0)
            _write_module(tmp / LATENTS_DIR / name, loc, act, rows, bounds)
            (tmp / LATENTS_DIR / name / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return DelphiExport(sorted(modules), n_windows, context, sum(len(a) for _, a in modules.values()))
