"""The outputs of the layer analyses, as formats with one owner each:

- `VarianceSummary` (summary.json, format `mlsae-variance-summary`) and the variance Dataset (variance.zarr,
  format `mlsae-variance`: counts, totals, probs [layer, latent]; layer_mean, layer_var, layer_std,
  n_layers_active [latent]), read together as a `VarianceOutput`;
- `CosineResult` (cosine.json, format `mlsae-cosine`).

Files written before these carried a format are read as version 0 (their fields are the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mlsae_analyze.layers import LayerDistribution
from mlsae_cache.core.checksums import check_manifest, read_manifest, write_manifest
from mlsae_cache.core.errors import CorruptError, NotFoundError, StoreError
from mlsae_cache.core.records import Record, check_format
from mlsae_cache.core.verifying import Verified

SUMMARY_JSON = "summary.json"
VARIANCE_ZARR = "variance.zarr"
COSINE_JSON = "cosine.json"
VARIANCE_FORMAT, VARIANCE_VERSION = "mlsae-variance", 1
REMAKE_VARIANCE = "run `mlsae-analyze variance` again"


@dataclass(frozen=True)
class VarianceSummary(Record):
    """The variance decompositions over layers (definitions: docs/METHOD.md and mlsae_analyze/variance.py): the
    pooled numbers at the top, the per-window modes under `window` (normalised mixtures) and `reference` (the
    reference code's computation), the multi-layer curve under `multi_layer`, and what they were computed from."""

    FORMAT: ClassVar[str] = "mlsae-variance-summary"
    VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "variance summary"
    REMAKE: ClassVar[str] = "give the OUT of `mlsae-analyze variance LATENTS OUT`"

    var_total: float
    var_within_latent: float
    var_within_token: float
    rel_var_latent: float
    rel_var_token: float
    mean_layer_std: float
    frac_multi_layer: float
    n_rows: int
    reference: dict[str, Any]
    window: dict[str, Any] | None = None
    multi_layer: dict[str, dict[str, float]] | None = None
    latents: str | None = None
    n_latents: int | None = None
    k: int | None = None
    layers: list[int] | None = None
    sae_fingerprint: str | None = None
    cache_fingerprint: str | None = None
    min_count: int = 1
    include_untrainable: bool = False


@dataclass(frozen=True)
class CosineResult(Record):
    """Adjacent-layer cosine similarity of the mean-centred residual stream: one value per pair of adjacent
    stored layers, over `n_tokens` trainable tokens of cache `cache`."""

    FORMAT: ClassVar[str] = "mlsae-cosine"
    VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "cosine result"
    REMAKE: ClassVar[str] = "give the OUT of `mlsae-analyze cosine CACHE OUT`"

    layer_pairs: list[list[int]]
    cosine: list[float]
    n_tokens: int
    cache: str | None = None

    def __post_init__(self) -> None:
        if not self.cosine or len(self.layer_pairs) != len(self.cosine):
            raise StoreError("a cosine result needs matching, non-empty `layer_pairs` and `cosine` lists")


def variance_dataset(
    dist: LayerDistribution,
    counts: np.ndarray,
    totals: np.ndarray,
    n_active: np.ndarray,
    layers: tuple[int, ...],
    attrs: dict[str, Any],
) -> Any:
    """The variance Dataset of the format (dims layer, latent), with its format and version as attributes."""
    import xarray as xr

    per_pair = ("layer", "latent")
    data = {
        "counts": (per_pair, counts),
        "totals": (per_pair, totals),
        "probs": (per_pair, dist.probs),
        "layer_mean": ("latent", dist.mean),
        "layer_var": ("latent", dist.var),
        "layer_std": ("latent", dist.std),
        "n_layers_active": ("latent", n_active),
    }
    coords = {"layer": np.asarray(layers), "latent": np.arange(totals.shape[1])}
    return xr.Dataset(data, coords=coords, attrs={"format": VARIANCE_FORMAT, "version": VARIANCE_VERSION, **attrs})


@dataclass(frozen=True)
class VarianceOutput:
    """What `variance` writes: the Dataset (lazy when read back) and the summary."""

    dataset: Any
    summary: VarianceSummary
    path: Path | None = field(default=None)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.dataset["layer"].values)

    @property
    def probs(self) -> np.ndarray:
        """P_j(l): [L, n] float64, NaN columns for latents that never fire."""
        return np.asarray(self.dataset["probs"].values, dtype=np.float64)

    @property
    def layer_mean(self) -> np.ndarray:
        return np.asarray(self.dataset["layer_mean"].values, dtype=np.float64)

    @property
    def layer_std(self) -> np.ndarray:
        return np.asarray(self.dataset["layer_std"].values, dtype=np.float64)

    def latent(self, j: int) -> dict[str, Any]:
        """One latent's slice: probs, counts, totals [L]; layer_mean, layer_std, n_layers_active."""
        sel = self.dataset.isel(latent=j)
        names = ("probs", "counts", "totals", "layer_mean", "layer_std", "n_layers_active")
        return {name: np.asarray(sel[name].values) for name in names}

    def write(self, out: Path) -> None:
        """variance.zarr and summary.json into the directory `out`, then the manifest of every file in it."""
        self.dataset.to_zarr(Path(out) / VARIANCE_ZARR, mode="w", consolidated=False)
        self.summary.write(Path(out) / SUMMARY_JSON)
        write_manifest(Path(out))

    @classmethod
    def read(cls, path: Path | str) -> VarianceOutput:
        """A `variance` OUT directory, checked; one-line errors naming what is wrong."""
        import xarray as xr

        path = Path(path)
        hint = f"give the OUT of `mlsae-analyze variance LATENTS {path}`"
        if not path.is_dir():
            raise NotFoundError(f"variance output {path} does not exist or is not a directory ({hint})")
        files = read_manifest(path, REMAKE_VARIANCE)
        if files is not None:  # a few small files: all of them are checked (older outputs carry no manifest)
            check_manifest(path, files, REMAKE_VARIANCE)
        summary = VarianceSummary.read(path / SUMMARY_JSON)
        try:
            ds = xr.open_zarr(str(path / VARIANCE_ZARR), consolidated=False)
            missing = [n for n in ("probs", "layer_mean", "layer_std", "counts", "totals") if n not in ds]
        except (OSError, KeyError, ValueError) as e:
            raise StoreError(f"{path}/{VARIANCE_ZARR} is missing or unreadable ({e}; {hint})") from e
        if missing:
            raise StoreError(f"{path}/{VARIANCE_ZARR} lacks {', '.join(missing)} ({hint})")
        check_format(dict(ds.attrs), VARIANCE_FORMAT, VARIANCE_VERSION, path, "variance output", hint, legacy=True)
        return cls(ds, summary, path)


def verify_variance(path: Path) -> Verified:
    """Check a `variance` output for `mlsae-cache verify`: every file against its manifest (on reading it), then
    every value read once."""
    files = read_manifest(path, REMAKE_VARIANCE)
    try:
        output = VarianceOutput.read(path)
        output.dataset.load()
    except StoreError as e:  # damage in an output without a manifest, found by reading it
        raise CorruptError(str(e)) from e
    except (OSError, ValueError, RuntimeError) as e:  # an undecodable chunk of an output without a manifest
        raise CorruptError(f"{path}/{VARIANCE_ZARR} is unreadable ({e}; {REMAKE_VARIANCE})") from e
    if files is None:
        note = f"{path} has no manifest of checksums (an older output): its files were read, their values not checked"
        return Verified("variance output", 2, "files", (note,))
    return Verified("variance output", len(files), "files")
