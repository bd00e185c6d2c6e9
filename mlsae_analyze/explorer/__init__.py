"""The explorer: `mlsae-analyze index` precomputes a latent-major index of an MLSAE's latents (build.py, format
in index.py), and `mlsae-analyze explore` serves pages and a JSON API over it and the stores it names (app.py),
reading example windows from the latents store at request time (store.py). The front end is hand-written
JavaScript and SVG in `static/`, package data served by the app itself: no third-party script, no request
outside the server's origin. docs/EXPLORER.md is the user's guide.

The names below are imported from their submodules on first use (FastAPI is imported only by the server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlsae_cache.core.exports import lazy_exports

if TYPE_CHECKING:
    from mlsae_analyze.explorer.build import IndexConfig, IndexResult, run_index
    from mlsae_analyze.explorer.index import ExplorerIndex, IndexMeta
    from mlsae_analyze.explorer.serve import ExploreConfig, create_app, serve

_EXPORTS = {
    "IndexConfig": "mlsae_analyze.explorer.build",
    "IndexResult": "mlsae_analyze.explorer.build",
    "run_index": "mlsae_analyze.explorer.build",
    "ExplorerIndex": "mlsae_analyze.explorer.index",
    "IndexMeta": "mlsae_analyze.explorer.index",
    "ExploreConfig": "mlsae_analyze.explorer.serve",
    "create_app": "mlsae_analyze.explorer.serve",
    "serve": "mlsae_analyze.explorer.serve",
}

__all__ = [
    "ExploreConfig",
    "ExplorerIndex",
    "IndexConfig",
    "IndexMeta",
    "IndexResult",
    "create_app",
    "run_index",
    "serve",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
