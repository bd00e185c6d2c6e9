"""Training one TopK sparse autoencoder on the rows of every layer of a cache (a multi-layer SAE), and measuring
it: FVU, MSE and L0 per layer, delta cross-entropy and KL by splicing it into the model, and a layer-by-layer
comparison with single-layer SAEs.

The public API is below; each name is imported from its submodule on first use, so `import mlsae_train` loads
no torch. Example: `from mlsae_train import TrainConfig, fit`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlsae_cache.core.exports import lazy_exports

if TYPE_CHECKING:
    from mlsae_train.checkpoint import convert_reference, load_sae, save_sae
    from mlsae_train.compare import CompareConfig, run_compare
    from mlsae_train.config import TrainConfig
    from mlsae_train.evaluate import EvalConfig, run_eval
    from mlsae_train.lens import Lens, has_lens, lens_of, load_lens
    from mlsae_train.lens_eval import LensEvalConfig, LensEvalResult, run_eval_lens
    from mlsae_train.lens_train import LensConfig, run_lens
    from mlsae_train.loader import LoaderConfig, RowLoader
    from mlsae_train.results import CompareResult, EvalResult
    from mlsae_train.sae import SaeConfig, TopKSAE
    from mlsae_train.splice import SpliceConfig
    from mlsae_train.sweep import SweepConfig, SweepResult, run_sweep
    from mlsae_train.trainer import FitResult, fit

_EXPORTS: dict[str, str] = {
    "TrainConfig": "mlsae_train.config",
    "fit": "mlsae_train.trainer",
    "FitResult": "mlsae_train.trainer",
    "EvalConfig": "mlsae_train.evaluate",
    "run_eval": "mlsae_train.evaluate",
    "EvalResult": "mlsae_train.results",
    "CompareResult": "mlsae_train.results",
    "CompareConfig": "mlsae_train.compare",
    "run_compare": "mlsae_train.compare",
    "SpliceConfig": "mlsae_train.splice",
    "TopKSAE": "mlsae_train.sae",
    "SaeConfig": "mlsae_train.sae",
    "load_sae": "mlsae_train.checkpoint",
    "save_sae": "mlsae_train.checkpoint",
    "convert_reference": "mlsae_train.checkpoint",
    "LoaderConfig": "mlsae_train.loader",
    "RowLoader": "mlsae_train.loader",
    "SweepConfig": "mlsae_train.sweep",
    "SweepResult": "mlsae_train.sweep",
    "run_sweep": "mlsae_train.sweep",
    "Lens": "mlsae_train.lens",
    "has_lens": "mlsae_train.lens",
    "lens_of": "mlsae_train.lens",
    "load_lens": "mlsae_train.lens",
    "LensConfig": "mlsae_train.lens_train",
    "run_lens": "mlsae_train.lens_train",
    "LensEvalConfig": "mlsae_train.lens_eval",
    "LensEvalResult": "mlsae_train.lens_eval",
    "run_eval_lens": "mlsae_train.lens_eval",
}
"""Exported name -> the submodule that defines it."""

__all__ = [
    "CompareConfig",
    "CompareResult",
    "EvalConfig",
    "EvalResult",
    "FitResult",
    "Lens",
    "LensConfig",
    "LensEvalConfig",
    "LensEvalResult",
    "LoaderConfig",
    "RowLoader",
    "SaeConfig",
    "SpliceConfig",
    "SweepConfig",
    "SweepResult",
    "TopKSAE",
    "TrainConfig",
    "convert_reference",
    "fit",
    "has_lens",
    "lens_of",
    "load_lens",
    "load_sae",
    "run_compare",
    "run_eval",
    "run_eval_lens",
    "run_lens",
    "run_sweep",
    "save_sae",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
