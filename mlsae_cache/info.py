"""What `mlsae-cache info` shows: the facts of a cache in one dictionary (JSON-ready)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlsae_cache.store import Cache
from mlsae_cache.workers import missing_shards, read_plan


def cache_info(path: Path | str) -> dict[str, Any]:
    """Model, dataset, tokens, layers, size on disk, completeness (and a parallel harvest's progress)."""
    cache = Cache(path)
    m = cache.meta
    facts: dict[str, Any] = {
        "path": str(cache.path),
        "model": m.model.get("name"),
        "architecture": m.model.get("architecture"),
        "compute_dtype": m.model.get("compute_dtype"),
        "dataset": m.dataset.get("dataset"),
        "tokens": m.n_tokens,
        "complete": m.complete,
        "text_exhausted": m.exhausted,
        "layers": list(m.layers),
        "d_model": m.d_model,
        "context_length": m.context_length,
        "storage_dtype": m.storage_dtype,
        "chunk_tokens": m.chunk_tokens,
        "trainable_tokens": int(cache.trainable().sum()),
        "bytes_on_disk": cache.nbytes_stored(),
        "fingerprint": m.fingerprint,
    }
    plan = read_plan(cache.path)
    if plan is not None:
        missing = missing_shards(cache.path, plan)
        facts["shards_done"] = f"{plan.num_shards - len(missing)} of {plan.num_shards} (waiting for {missing})"
    return facts
