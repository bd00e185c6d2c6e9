"""What an SAE was trained on, for the metadata other tools read: model, hook, layers, context size, dataset and which
positions were trainable. Read from the SAE's cfg.json and, where given or still reachable, its cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlsae_cache.core.errors import InputError, MlsaeError
from mlsae_cache.store import CacheMeta, read_meta

log = logging.getLogger(__name__)

LOCAL_KEYS = ("converted_from",)
"""cfg.json keys holding local paths (besides every key ending in `_path`); provenance, never published."""

UNTRAINED_POSITIONS = (
    "trained only on trainable rows (no special tokens, no position 0 of a window): tools that encode every position "
    "(SAELens, SAE-Dashboard) see rows it never trained on, so their splice numbers differ from `mlsae-train eval`"
)


@dataclass(frozen=True)
class Provenance:
    """Where an SAE's rows came from. `policy` is the cache's trainable policy (exclude_special_tokens,
    exclude_position_0); None fields were not recorded."""

    model: str | None
    layers: tuple[int, ...]
    hook: str = "resid_post"
    context_size: int | None = None
    dataset: str | None = None
    policy: dict[str, bool] = field(default_factory=dict)


def _cache_meta(sae_cfg: dict[str, Any], cache: Path | None) -> CacheMeta | None:
    """The metadata of `cache`, or of the cache cfg.json names if it is still there (else None, with a warning)."""
    where = cache if cache is not None else sae_cfg.get("cache_path")
    if not where:
        return None
    try:
        meta = read_meta(where)
    except MlsaeError as e:
        if cache is not None:
            raise
        log.warning("the SAE's cache %s cannot be read (%s); context size and dataset stay unrecorded", where, e)
        return None
    recorded = sae_cfg.get("cache_fingerprint")
    if recorded and meta.fingerprint != recorded:
        if cache is not None:
            raise InputError(
                f"--cache {cache} has fingerprint {meta.fingerprint}, but the SAE was trained on {recorded} "
                "(give the cache the SAE was trained on, or leave --cache out)"
            )
        return None
    return meta


def provenance(sae_cfg: dict[str, Any], cache: Path | None = None) -> Provenance:
    """The provenance of an SAE from its cfg.json dict and, optionally, the cache it was trained on."""
    meta = _cache_meta(sae_cfg, cache)
    layers = sae_cfg.get("layers") or (list(meta.layers) if meta is not None else [])
    if meta is None:
        return Provenance(sae_cfg.get("model"), tuple(layers), sae_cfg.get("hook") or "resid_post")
    dataset = meta.dataset.get("dataset")
    return Provenance(
        sae_cfg.get("model") or meta.model.get("name"),
        tuple(layers),
        meta.hook,
        meta.context_length,
        None if dataset is None else str(dataset),
        {k: bool(v) for k, v in meta.trainable_policy.items()},
    )


def public_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """cfg.json without the local paths it records as provenance (what is published)."""
    public = {k: v for k, v in cfg.items() if not k.endswith("_path") and k not in LOCAL_KEYS}
    for key in ("imported_from", "tuned_lens"):  # their `source` is a local path
        if isinstance(public.get(key), dict):
            public[key] = {k: v for k, v in public[key].items() if k != "source"}
    return public
