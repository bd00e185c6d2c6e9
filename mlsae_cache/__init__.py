"""Activation caches: every layer's residual stream of a language model, harvested (or imported from an array) into a
checksummed Zarr store that training and analysis read chunk by chunk.

The public API is below; each name is imported from its submodule on first use, so `import mlsae_cache` loads
neither torch nor zarr. Example: `from mlsae_cache import HarvestConfig, run_harvest`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlsae_cache.core.exports import lazy_exports

if TYPE_CHECKING:
    from mlsae_cache.config import HarvestConfig
    from mlsae_cache.core.errors import (
        CorruptError,
        InputError,
        LockedError,
        MlsaeError,
        NotFoundError,
        RuntimeFailure,
        StoreError,
    )
    from mlsae_cache.harvest import run_harvest
    from mlsae_cache.importer import ImportConfig, import_array
    from mlsae_cache.info import cache_info
    from mlsae_cache.models import load_model
    from mlsae_cache.pipeline import HarvestResult
    from mlsae_cache.policy import TrainablePolicy
    from mlsae_cache.store import Cache, CacheMeta, TokenRows, open_cache, read_meta, verify

_EXPORTS: dict[str, str] = {
    "HarvestConfig": "mlsae_cache.config",
    "run_harvest": "mlsae_cache.harvest",
    "HarvestResult": "mlsae_cache.pipeline",
    "ImportConfig": "mlsae_cache.importer",
    "import_array": "mlsae_cache.importer",
    "Cache": "mlsae_cache.store",
    "CacheMeta": "mlsae_cache.store",
    "TokenRows": "mlsae_cache.store",
    "open_cache": "mlsae_cache.store",
    "read_meta": "mlsae_cache.store",
    "verify": "mlsae_cache.store",
    "cache_info": "mlsae_cache.info",
    "TrainablePolicy": "mlsae_cache.policy",
    "load_model": "mlsae_cache.models",
    "MlsaeError": "mlsae_cache.core.errors",
    "InputError": "mlsae_cache.core.errors",
    "NotFoundError": "mlsae_cache.core.errors",
    "StoreError": "mlsae_cache.core.errors",
    "CorruptError": "mlsae_cache.core.errors",
    "LockedError": "mlsae_cache.core.errors",
    "RuntimeFailure": "mlsae_cache.core.errors",
}
"""Exported name -> the submodule that defines it."""

__all__ = [
    "Cache",
    "CacheMeta",
    "CorruptError",
    "HarvestConfig",
    "HarvestResult",
    "ImportConfig",
    "InputError",
    "LockedError",
    "MlsaeError",
    "NotFoundError",
    "RuntimeFailure",
    "StoreError",
    "TokenRows",
    "TrainablePolicy",
    "cache_info",
    "import_array",
    "load_model",
    "open_cache",
    "read_meta",
    "run_harvest",
    "verify",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
