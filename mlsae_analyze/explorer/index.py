"""The explorer index, format `mlsae-explorer-index` version 1: the only module that knows its array names.

A Zarr v3 group, latent-major, so that everything a page shows about one latent is one small read per array
(chunks of CHUNK_LATENTS latents; nothing in it grows with the number of tokens but `doc_start`). With N latents,
L layers and T = L + 1 tabs (tab 0: all layers; tab 1 + i: layer position i):

    stat_count      (latent, tab)            int64    rows where the latent fires (tab 0: tokens, at any layer)
    stat_sum        (latent, tab)            float64  sum of its activations there (tab 0: of each token's maximum)
    stat_sum_sq     (latent, tab)            float64  sum of their squares
    stat_max        (latent, tab)            float32  the largest
    p_layer         (latent, layer)          float64  P_j(l), copied from the variance output
    mean_layer_pos  (latent,)                float64  E[L|j] in layer positions, from the variance output
    std_layer_pos   (latent,)                float64  sqrt(Var[L|j]), from the variance output
    within_token_var (latent,)               float64  E_T[Var(L|T, j)]: the spread over layers inside one token
    across_token_var (latent,)               float64  Var_T(E[L|T, j]): how the token's own mean layer moves
    order_by_mean_layer (rank,)              int32    latent ids by mean layer; latents that never fire last
    top_code        (latent, tab, top)       int64    the strongest rows, code = token * L + layer (-1: none)
    top_value       (latent, tab, top)       float32  their activations
    random_code     (latent, tab, random)    int64    rows drawn uniformly among those where the latent fires
    quantile_code   (latent, tab, quantile, per_quantile)  int64  rows drawn within each quantile group
    quantile_edges  (latent, tab, edge)      float32  group q holds activations in (edges[q], edges[q + 1]]
    act_histogram   (latent, tab, bin)       int64    activations in `bins` equal bins of [0, stat_max[j, 0]]
    similar_latent  (latent, similar)        int32    the latents whose decoder directions are closest
    similar_cosine  (latent, similar)        float32  their cosine similarity
    logit_pos_token, logit_neg_token (latent, logit)  int32    token ids the decoder direction promotes / suppresses
    logit_pos_value, logit_neg_value (latent, logit)  float32  their logits (absent when built without a model)
    doc_start       (doc_edge,)              int64    first row of each context window, then n_tokens

Root attribute `mlsae`: `IndexMeta`. An index is written whole (core.outputs.output_dir), never in place.
The job that computes it is build.py; the server reads it through `ExplorerIndex`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr

from mlsae_analyze import topn
from mlsae_cache.core.checksums import check_manifest, read_manifest, write_manifest
from mlsae_cache.core.errors import InputError, NotFoundError, StoreError
from mlsae_cache.core.records import check_format
from mlsae_cache.core.verifying import Verified
from mlsae_cache.core.zarrstore import (
    check_root_seal,
    create_array,
    damaged_chunk,
    get_array,
    read_root_attribute,
    root_attributes,
    verify_group,
    writable,
)

FORMAT = "mlsae-explorer-index"
VERSION = 1
KIND = "explorer index"
CHUNK_LATENTS = 64
"""Latents per chunk: one latent's page reads one chunk of each array (a few hundred KB at most)."""
EMPTY = topn.EMPTY
"""The code of an empty example slot (what the passes' running top-n leave there)."""
REBUILD = "build it again with `mlsae-analyze index`"
KINDS = ("top", "quantile", "random")
"""The kinds of example lists."""

_LATENT_ARRAYS = {
    "stat_count": np.int64,
    "stat_sum": np.float64,
    "stat_sum_sq": np.float64,
    "stat_max": np.float32,
    "p_layer": np.float64,
    "mean_layer_pos": np.float64,
    "std_layer_pos": np.float64,
    "within_token_var": np.float64,
    "across_token_var": np.float64,
    "top_code": np.int64,
    "top_value": np.float32,
    "random_code": np.int64,
    "quantile_code": np.int64,
    "quantile_edges": np.float32,
    "act_histogram": np.int64,
    "similar_latent": np.int32,
    "similar_cosine": np.float32,
}
_LOGIT_ARRAYS = {
    "logit_pos_token": np.int32,
    "logit_pos_value": np.float32,
    "logit_neg_token": np.int32,
    "logit_neg_value": np.float32,
}
_DIMS = {
    "stat_count": ("latent", "tab"),
    "stat_sum": ("latent", "tab"),
    "stat_sum_sq": ("latent", "tab"),
    "stat_max": ("latent", "tab"),
    "p_layer": ("latent", "layer"),
    "top_code": ("latent", "tab", "top"),
    "top_value": ("latent", "tab", "top"),
    "random_code": ("latent", "tab", "random"),
    "quantile_code": ("latent", "tab", "quantile", "per_quantile"),
    "quantile_edges": ("latent", "tab", "edge"),
    "act_histogram": ("latent", "tab", "bin"),
    "similar_latent": ("latent", "similar"),
    "similar_cosine": ("latent", "similar"),
    **dict.fromkeys(_LOGIT_ARRAYS, ("latent", "logit")),
}
_ORDER, _DOC_START = "order_by_mean_layer", "doc_start"
ARRAY_NAMES = (*_LATENT_ARRAYS, *_LOGIT_ARRAYS, _ORDER, _DOC_START)
"""Every array name of the format (a test checks that no other module spells one)."""


@dataclass(frozen=True)
class Source:
    """One store an index was built from: its resolved path and its fingerprint (fingerprints.py)."""

    path: str
    fingerprint: str


@dataclass(frozen=True)
class IndexMeta:
    """The root attribute `mlsae` of an explorer index.

    `n_rows`: tokens whose rows the statistics used (trainable ones unless `include_untrainable`, as in the
    variance output). `sources`: latents, variance, sae, cache. `logits`: logit effects per latent and sign (0: none,
    and `logits_note` says why). `eval`: per-layer `fvu` and `delta_ce` of an eval result, if one was given.
    `rebuild`: the command that builds this index again. `model`: the model given with `--model` (None: the one
    the cache names), which the server also decodes tokens with.
    """

    n_latents: int
    k: int
    layers: tuple[int, ...]
    n_tokens: int
    n_rows: int
    n_docs: int
    n_firing: int
    context_length: int
    include_untrainable: bool
    top: int
    random: int
    quantiles: int
    per_quantile: int
    bins: int
    similar: int
    logits: int
    seed: int
    sources: dict[str, Source]
    rebuild: str
    model: str | None = None
    logits_note: str | None = None
    d_model: int | None = None
    eval: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | str) -> IndexMeta:
        check_format(data, FORMAT, VERSION, path, KIND, "build it again with `mlsae-analyze index`")
        kwargs = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            kwargs["layers"] = tuple(kwargs["layers"])
            kwargs["sources"] = {name: Source(**s) for name, s in kwargs["sources"].items()}
            return cls(**kwargs)
        except (KeyError, TypeError, AttributeError) as e:
            raise StoreError(f"{path}: the explorer index's metadata is damaged ({e}); build it again") from e


def read_index_meta(path: Path | str) -> IndexMeta:
    attr = read_root_attribute(path, KIND, "give the OUT of `mlsae-analyze index`")
    meta = IndexMeta.from_dict(attr, path)
    check_root_seal(attr, path, KIND)
    return meta


class IndexArrays(NamedTuple):
    """Everything an index holds, in memory, as build.py computes it (shapes: module docstring)."""

    stat_count: np.ndarray
    stat_sum: np.ndarray
    stat_sum_sq: np.ndarray
    stat_max: np.ndarray
    p_layer: np.ndarray
    mean_layer_pos: np.ndarray
    std_layer_pos: np.ndarray
    within_token_var: np.ndarray
    across_token_var: np.ndarray
    top_code: np.ndarray
    top_value: np.ndarray
    random_code: np.ndarray
    quantile_code: np.ndarray
    quantile_edges: np.ndarray
    act_histogram: np.ndarray
    similar_latent: np.ndarray
    similar_cosine: np.ndarray
    order_by_mean_layer: np.ndarray
    doc_start: np.ndarray
    logits: LogitEffects | None = None


class LogitEffects(NamedTuple):
    """Token ids and logits of the decoder directions through the model's final norm and unembedding: [N, T]."""

    pos_token: np.ndarray
    pos_value: np.ndarray
    neg_token: np.ndarray
    neg_value: np.ndarray


def _write(group: zarr.Group, name: str, values: np.ndarray) -> None:
    dims = _DIMS.get(name, ("latent",) if name != _DOC_START else ("doc_edge",))
    if name == _ORDER:
        dims = ("rank",)
    chunks = (CHUNK_LATENTS, *values.shape[1:]) if dims[0] == "latent" else values.shape
    arr = create_array(group, name, values.shape, chunks, values.dtype, dims, compress=True)
    writable(arr)[...] = values


def write_index(path: Path, meta: IndexMeta, arrays: IndexArrays) -> None:
    """Write a whole index into the (fresh) directory `path`; the root attribute goes with the group."""
    group = zarr.create_group(str(path), zarr_format=3, attributes=root_attributes(meta.to_dict()))
    dtypes = {**_LATENT_ARRAYS, _ORDER: np.int32, _DOC_START: np.int64}
    for name, dtype in dtypes.items():
        _write(group, name, np.ascontiguousarray(getattr(arrays, name), dtype=dtype))
    if arrays.logits is not None:
        for name, values in zip(_LOGIT_ARRAYS, arrays.logits, strict=True):
            _write(group, name, np.ascontiguousarray(values, dtype=_LOGIT_ARRAYS[name]))
    write_manifest(path)


class LatentEntry(NamedTuple):
    """One latent's row of the index: per tab [T] the rows where it fires, the sum, sum of squares and maximum of
    its activations there; per layer [L] P_j(l); histogram [T, bins]; quantile edges [T, quantiles + 1]."""

    fired: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    peak: np.ndarray
    layer_probs: np.ndarray
    mean_layer: float
    std_layer: float
    within_var: float
    across_var: float
    histogram: np.ndarray
    quantile_edges: np.ndarray
    similar_latent: np.ndarray
    similar_cosine: np.ndarray
    logits: LogitEffects | None


class ExampleSlots(NamedTuple):
    """One list of examples of a latent in one tab: codes (token * L + layer, EMPTY for none) [n], the stored
    activations where the list has them (top) else None; for quantile lists, the group of each slot and the
    groups' edges [quantiles + 1]."""

    codes: np.ndarray
    values: np.ndarray | None = None
    groups: np.ndarray | None = None
    edges: np.ndarray | None = None


class TableColumns(NamedTuple):
    """The per-latent columns of the latents table, each [N]."""

    fired: np.ndarray
    peak: np.ndarray
    mean_layer: np.ndarray
    std_layer: np.ndarray
    within_var: np.ndarray
    across_var: np.ndarray
    top_logit: np.ndarray | None


class ExplorerIndex:
    """Read access to an explorer index; everything outside this module reads indexes through it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.meta = read_index_meta(self.path)
        files = read_manifest(self.path, REBUILD)
        if files is not None:  # the metadata files, a few KB (each chunk carries its own crc32c, checked on reading)
            check_manifest(self.path, files, REBUILD, only=("zarr.json",))
        self._group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        """The handle of array `name`, opened once (opening one reads its metadata file)."""
        if name not in self._arrays:
            self._arrays[name] = get_array(self._group, name)
        return self._arrays[name]

    def _read(self, name: str, selection: Any = slice(None), orthogonal: bool = False) -> np.ndarray:
        arr = self._array(name)
        try:
            return np.asarray(arr.get_orthogonal_selection(selection) if orthogonal else arr[selection])
        except Exception as e:  # zarr's error for a damaged chunk: name its file
            raise damaged_chunk(arr, (0, arr.shape[0]), e) from e

    def _row(self, name: str, j: int) -> np.ndarray:
        return self._read(name, j)

    def check_latent(self, j: int) -> None:
        if not 0 <= j < self.meta.n_latents:
            raise NotFoundError(f"latent {j} does not exist (this SAE has latents 0..{self.meta.n_latents - 1})")

    def tab(self, layer: int | None) -> int:
        """The tab of block index `layer` (None: all layers); InputError naming the blocks otherwise."""
        if layer is None:
            return 0
        if layer not in self.meta.layers:
            raise InputError(f"layer {layer} is not in this index (it holds blocks {list(self.meta.layers)})")
        return 1 + self.meta.layers.index(layer)

    def latent(self, j: int) -> LatentEntry:
        """Everything the index holds about latent j (NotFoundError for a latent outside the SAE)."""
        self.check_latent(j)
        logits = LogitEffects(*(self._row(name, j) for name in _LOGIT_ARRAYS)) if self.meta.logits else None
        return LatentEntry(
            fired=self._row("stat_count", j),
            total=self._row("stat_sum", j),
            total_sq=self._row("stat_sum_sq", j),
            peak=self._row("stat_max", j),
            layer_probs=self._row("p_layer", j),
            mean_layer=float(self._row("mean_layer_pos", j)),
            std_layer=float(self._row("std_layer_pos", j)),
            within_var=float(self._row("within_token_var", j)),
            across_var=float(self._row("across_token_var", j)),
            histogram=self._row("act_histogram", j),
            quantile_edges=self._row("quantile_edges", j),
            similar_latent=self._row("similar_latent", j),
            similar_cosine=self._row("similar_cosine", j),
            logits=logits,
        )

    def examples(self, j: int, tab: int, kind: str) -> ExampleSlots:
        """The example slots of latent j in tab `tab` of kind `kind` (KINDS)."""
        self.check_latent(j)
        if kind == "top":
            codes, values = (self._read(name, (j, tab)) for name in ("top_code", "top_value"))
            return ExampleSlots(codes, values)
        if kind == "random":
            return ExampleSlots(self._read("random_code", (j, tab)))
        if kind == "quantile":
            codes = self._read("quantile_code", (j, tab))
            groups = np.repeat(np.arange(codes.shape[0]), codes.shape[1])
            return ExampleSlots(codes.ravel(), None, groups, self._read("quantile_edges", (j, tab)))
        raise InputError(f"kind {kind!r} is not one of {', '.join(KINDS)}")

    def table(self) -> TableColumns:
        """The columns of the latents table for every latent (N values each: read once, kept by the caller)."""
        top_logit = self._read("logit_pos_token", (slice(None), 0)) if self.meta.logits else None
        return TableColumns(
            fired=self._read("stat_count", (slice(None), 0)),
            peak=self._read("stat_max", (slice(None), 0)),
            mean_layer=self._read("mean_layer_pos"),
            std_layer=self._read("std_layer_pos"),
            within_var=self._read("within_token_var"),
            across_var=self._read("across_token_var"),
            top_logit=top_logit,
        )

    def arrays(self) -> IndexArrays:
        """Every array of the index in memory (for tests and tools; the server reads one latent at a time)."""
        held = {name: self._read(name) for name in (*_LATENT_ARRAYS, _ORDER, _DOC_START)}
        logits = LogitEffects(*(self._read(n) for n in _LOGIT_ARRAYS)) if self.meta.logits else None
        return IndexArrays(**held, logits=logits)

    def typical(self) -> np.ndarray:
        """Each latent's mean activation where it fires, per tab (all, then each layer); NaN where it never
        does: [N, 1 + L] float64 (read once, kept by the caller)."""
        count, total = self._read("stat_count"), self._read("stat_sum")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def histograms(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The activation histograms of `latents` [m] (sorted, unique): counts [m, 1 + L, bins] over equal bins
        of [0, scale], and each latent's scale [m] (its largest activation)."""
        counts = self._read("act_histogram", (latents,), orthogonal=True)
        return counts, self._read("stat_max", (latents, 0), orthogonal=True)

    def layer_probs(self) -> np.ndarray:
        """P_j(l) of every latent: [N, L] (for the overview heatmap)."""
        return self._read("p_layer")

    def mean_layer_order(self) -> np.ndarray:
        """Latent ids by mean layer, the `n_firing` that fire first: [N]."""
        return self._read(_ORDER)

    def doc_rows(self, d: int) -> tuple[int, int]:
        """The rows [start, stop) of context window d (NotFoundError for a window the store does not hold)."""
        if not 0 <= d < self.meta.n_docs:
            held = f"the store holds windows 0..{self.meta.n_docs - 1}"
            raise NotFoundError(f"context window {d} does not exist ({held})")
        start, stop = self._read(_DOC_START, slice(d, d + 2))
        return int(start), int(stop)


def verify_index(path: Path) -> Verified:
    """Check an explorer index for `mlsae-cache verify`: its record's seal, then every file against its manifest
    (an older index without one: every chunk against its crc32c)."""
    read_index_meta(path)
    files = read_manifest(path, REBUILD)
    if files is not None:
        return Verified(KIND, check_manifest(path, files, REBUILD), "files")
    notes = (f"{path} has no manifest of checksums (an older index): its chunks were checked, its metadata files not",)
    return Verified(KIND, verify_group(path, 0, 1, kind=KIND), "chunks", notes)
