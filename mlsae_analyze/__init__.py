"""Analysis of a trained multi-layer SAE: encode a cache into a latents store, then see where latents fire over
layers (variance decomposition, per-latent layer distribution, adjacent-layer cosine similarity, max-activating
examples, single-prompt heatmaps) and gather it all into a report.

The public API is below; each name is imported from its submodule on first use, so `import mlsae_analyze` loads
neither torch nor zarr. Example: `from mlsae_analyze import VarianceConfig, run_variance`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlsae_cache.core.exports import lazy_exports

if TYPE_CHECKING:
    from mlsae_analyze.cosine import CosineConfig, run_cosine
    from mlsae_analyze.encode import EncodeConfig, run_encode
    from mlsae_analyze.example_pages import run_examples
    from mlsae_analyze.examples import ExamplesConfig
    from mlsae_analyze.latents import Latents, LatentsMeta, latent_arrays
    from mlsae_analyze.layers import layer_distribution
    from mlsae_analyze.prompt import PromptConfig, run_prompt_heatmap
    from mlsae_analyze.report import HeatmapConfig, ReportConfig, run_heatmap, run_report
    from mlsae_analyze.results import CosineResult, VarianceOutput, VarianceSummary
    from mlsae_analyze.variance import VarianceConfig, VarianceParams, compute_variance, run_variance

_EXPORTS: dict[str, str] = {
    "EncodeConfig": "mlsae_analyze.encode",
    "run_encode": "mlsae_analyze.encode",
    "Latents": "mlsae_analyze.latents",
    "LatentsMeta": "mlsae_analyze.latents",
    "latent_arrays": "mlsae_analyze.latents",
    "VarianceConfig": "mlsae_analyze.variance",
    "VarianceParams": "mlsae_analyze.variance",
    "compute_variance": "mlsae_analyze.variance",
    "run_variance": "mlsae_analyze.variance",
    "VarianceOutput": "mlsae_analyze.results",
    "VarianceSummary": "mlsae_analyze.results",
    "CosineResult": "mlsae_analyze.results",
    "CosineConfig": "mlsae_analyze.cosine",
    "run_cosine": "mlsae_analyze.cosine",
    "ExamplesConfig": "mlsae_analyze.examples",
    "run_examples": "mlsae_analyze.example_pages",
    "PromptConfig": "mlsae_analyze.prompt",
    "run_prompt_heatmap": "mlsae_analyze.prompt",
    "ReportConfig": "mlsae_analyze.report",
    "run_report": "mlsae_analyze.report",
    "HeatmapConfig": "mlsae_analyze.report",
    "run_heatmap": "mlsae_analyze.report",
    "layer_distribution": "mlsae_analyze.layers",
}
"""Exported name -> the submodule that defines it."""

__all__ = [
    "CosineConfig",
    "CosineResult",
    "EncodeConfig",
    "ExamplesConfig",
    "HeatmapConfig",
    "Latents",
    "LatentsMeta",
    "PromptConfig",
    "ReportConfig",
    "VarianceConfig",
    "VarianceOutput",
    "VarianceParams",
    "VarianceSummary",
    "compute_variance",
    "latent_arrays",
    "layer_distribution",
    "run_cosine",
    "run_encode",
    "run_examples",
    "run_heatmap",
    "run_prompt_heatmap",
    "run_report",
    "run_variance",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
