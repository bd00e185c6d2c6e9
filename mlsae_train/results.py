"""The results the training package writes for others to read: `mlsae-train eval --out` (format `mlsae-eval`) and
`mlsae-train compare` (format `mlsae-compare`), as versioned records (core.records)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from mlsae_cache.core.errors import StoreError
from mlsae_cache.core.records import Record

COMPARE_JSON = "compare.json"
"""The file `mlsae-train compare` writes in its OUT."""

PER_LAYER = ("fvu", "mse", "l0", "n_rows", "fvu_lens")
SPLICED_PER_LAYER = ("delta_ce", "kl", "kl_clean_spliced", "kl_spliced_clean")


@dataclass(frozen=True)
class SpliceMetrics:
    """Delta CE and KL per layer (lists follow `layer`) and the clean cross-entropy, nats per token."""

    layer: list[int]
    delta_ce: list[float]
    kl: list[float]
    kl_clean_spliced: list[float]
    kl_spliced_clean: list[float]
    clean_ce: float
    delta_ce_mean: float
    kl_mean: float
    kl_spliced_clean_mean: float
    n_windows: int
    n_predicted: int


@dataclass(frozen=True)
class EvalResult(Record):
    """Per-layer metrics of an SAE on cache rows: FVU (raw units, dataset-level), MSE, L0 and rows per layer;
    the dead fraction over all layers; with splicing, delta CE and KL per layer and their means; for an SAE fitted
    on lens-translated rows, `fvu_lens` (and its mean), the FVU in the lens space (`fvu` stays in raw units). `kl` is
    KL(p_clean || p_spliced), also named `kl_clean_spliced`; `kl_spliced_clean` is the other direction (the one the
    reference code computes, there summed over a sequence)."""

    FORMAT: ClassVar[str] = "mlsae-eval"
    VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "eval result"
    REMAKE: ClassVar[str] = "write one with `mlsae-train eval SAE CACHE --out FILE`"

    layer: list[int]
    fvu: list[float | None]
    mse: list[float]
    l0: list[float]
    n_rows: list[int]
    dead_fraction: float
    fvu_mean: float
    delta_ce: list[float] | None = None
    kl: list[float] | None = None
    kl_clean_spliced: list[float] | None = None
    kl_spliced_clean: list[float] | None = None
    clean_ce: float | None = None
    delta_ce_mean: float | None = None
    kl_mean: float | None = None
    kl_spliced_clean_mean: float | None = None
    n_windows: int | None = None
    n_predicted: int | None = None
    sae: str | None = None
    cache: str | None = None
    start: int | None = None
    stop: int | None = None
    held_out: int | None = None
    fvu_lens: list[float | None] | None = None
    fvu_lens_mean: float | None = None

    def __post_init__(self) -> None:
        n = len(self.layer)
        lists = [name for name in PER_LAYER + SPLICED_PER_LAYER if getattr(self, name) is not None]
        if not isinstance(self.layer, list) or any(
            not isinstance(getattr(self, name), list) or len(getattr(self, name)) != n for name in lists
        ):
            raise StoreError(f"an eval result needs one value per layer in {', '.join(lists)}")

    @property
    def spliced(self) -> bool:
        return self.delta_ce is not None

    def with_splice(self, spliced: SpliceMetrics) -> EvalResult:
        """This result with the splice metrics added (their layers must be these)."""
        assert spliced.layer == self.layer
        fields = {k: v for k, v in spliced.__dict__.items() if k != "layer"}
        return replace(self, **fields)

    def token_range(self) -> str:
        """'tokens [a, b)', and whether they were held out from training (when the result knows)."""
        text = (
            f"tokens [{self.start:,}, {self.stop:,})" if self.start is not None and self.stop is not None else "tokens"
        )
        if self.held_out and self.start is not None:
            text += " (held out from training)" if self.start >= self.held_out else " (including training tokens)"
        return text

    def fvu_value(self, i: int) -> float:
        """The FVU of layer position i as a float (NaN for a layer without variance)."""
        value = self.fvu[i]
        return math.nan if value is None else float(value)


COMPARE_METRICS = ("fvu", "delta_ce", "kl", "kl_spliced_clean", "dead_fraction")
COMPARE_KINDS = ("mlsae", "single")
SHORT = {"fvu": "FVU", "delta_ce": "dCE", "kl": "KL", "kl_spliced_clean": "rKL", "dead_fraction": "dead"}


@dataclass(frozen=True)
class CompareResult(Record):
    """An MLSAE beside single-layer SAEs: one row per MLSAE layer, {"layer", "mlsae": {metric: value},
    "single": {metric: value} | None}; the clean CE and windows spliced (None without splicing); the inputs."""

    FORMAT: ClassVar[str] = "mlsae-compare"
    VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "compare result"
    REMAKE: ClassVar[str] = "give the OUT of `mlsae-train compare MLSAE OUT --cache CACHE --single L=DIR ...`"

    rows: list[dict[str, Any]]
    clean_ce: float | None = None
    n_windows: int | None = None
    sources: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.rows, list) or not self.rows or not all(_row_ok(row) for row in self.rows):
            raise StoreError("a compare result needs per-layer `rows` with `mlsae` and `single` metrics")

    def columns(self) -> list[str]:
        """The metrics present (fvu and dead_fraction always; delta_ce and kl with splicing)."""
        return [m for m in COMPARE_METRICS if any(m in row["mlsae"] for row in self.rows)]

    def table(self, short: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
        """Header and cells: per layer, each metric for the MLSAE then the single-layer SAE ('-' when absent)."""
        short = short or {
            "fvu": "FVU",
            "delta_ce": "dCE",
            "kl": "KL",
            "kl_spliced_clean": "rKL",
            "dead_fraction": "dead",
        }
        columns = self.columns()
        header = ["layer"] + [f"{short[m]} {kind}" for m in columns for kind in COMPARE_KINDS]
        cells = []
        for row in self.rows:
            values = [row[kind].get(m) if row[kind] else None for m in columns for kind in COMPARE_KINDS]
            cells.append([str(row["layer"])] + ["-" if v is None else f"{v:.4g}" for v in values])
        return header, cells


def _row_ok(row: Any) -> bool:
    """A row: {"layer": int, "mlsae": {"fvu": number, ...}, "single": {...} | null}."""
    if not isinstance(row, dict) or isinstance(row.get("layer"), bool) or not isinstance(row.get("layer"), int):
        return False
    sides = [row.get("mlsae")] + ([row["single"]] if row.get("single") is not None else [])
    return all(isinstance(side, dict) and isinstance(side.get("fvu"), int | float) for side in sides)
