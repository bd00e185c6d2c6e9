"""The latents store, format `mlsae-latents` version 2: the only module that knows its array names.

    indices   (token, layer, k)  int32    top-k latent ids of each (token, layer) row
    values    (token, layer, k)  float32  their post-ReLU activations (0 = inactive slot)
    token_ids, sequence, position, trainable (token,), layer (layer,)  copied from the cache (store.TokenRows)

Chunks hold `chunk_tokens` tokens with all layers and all k slots (one chunk per token chunk of the cache), with
zstd and a crc32c checksum. In version 2, each chunk of `indices` and `values` is one file of inner chunks of
INNER_TOKENS tokens (zarr's sharding codec), so that reading a few rows (an example window) decodes ~1/64 of a
chunk; version 1 stores (one compressed block per chunk) are read the same way. Rows are committed as in the
cache (core.zarrstore.ChunkCommitter): data first, then `n_tokens` in the root attribute.

Readers use `Latents` (typed: `chunks`, `tokens`, `arrays`, `to_xarray`) or, for an xarray Dataset of the same
variables from anywhere else, `latent_arrays`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr

from mlsae_cache.core.errors import StoreError
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.core.records import check_format
from mlsae_cache.core.verifying import Verified
from mlsae_cache.core.zarrstore import (
    ChunkCommitter,
    array_layouts,
    check_layout,
    check_root_seal,
    create_array,
    get_array,
    open_checked,
    read_array,
    read_root_attribute,
    read_rows,
    root_attributes,
    set_root_attribute,
    unfinished,
    verify_group,
    writable,
    write_rows_at,
)
from mlsae_cache.store import TOKEN_DTYPES, TokenRows

FORMAT = "mlsae-latents"
VERSION = 2
INNER_TOKENS = 64
"""Tokens per inner chunk of `indices` and `values` (version 2)."""
KIND = "latents store"
_INDICES, _VALUES, _LAYER = "indices", "values", "layer"
_SLOT_DIMS = ("token", "layer", "k")
_ARRAYS = (_INDICES, _VALUES, *TOKEN_DTYPES, _LAYER)
"""Every array of the format."""


@dataclass(frozen=True)
class LatentsMeta:
    """The root attribute `mlsae` of a latents store; `n_tokens` rows are committed."""

    n_latents: int
    k: int
    layers: tuple[int, ...]
    sae_fingerprint: str
    cache_fingerprint: str
    sae_path: str
    cache_path: str
    chunk_tokens: int
    n_tokens: int = 0
    total_tokens: int = 0
    complete: bool = False
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | str) -> LatentsMeta:
        check_format(data, FORMAT, VERSION, path, KIND, "re-run `mlsae-analyze encode`")
        kwargs = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            kwargs["layers"] = tuple(kwargs["layers"])
            return cls(**kwargs)
        except (KeyError, TypeError) as e:
            raise StoreError(f"{path}: the latents store's metadata is damaged ({e}); re-run `encode`") from e


def read_latents_meta(path: Path | str) -> LatentsMeta:
    attr = read_root_attribute(path, KIND, "give the OUT of `mlsae-analyze encode`")
    meta = LatentsMeta.from_dict(attr, path)
    check_root_seal(attr, path, KIND)
    return meta


def create_latents(path: Path | Any, meta: LatentsMeta) -> None:
    """An empty latents store (at a path, or in a zarr store); the root attribute is written with the group (a cut
    creation has 0 rows)."""
    where = str(path) if isinstance(path, Path | str) else path
    group = zarr.create_group(where, zarr_format=3, attributes=root_attributes(meta.to_dict()))
    n_layers, ct, k = len(meta.layers), meta.chunk_tokens, meta.k
    chunk = (ct, n_layers, k)
    sharded = meta.version >= 2 and (ct % INNER_TOKENS == 0 or ct < INNER_TOKENS)  # version 1: for its tests
    inner = (min(INNER_TOKENS, ct), n_layers, k) if sharded else None
    create_array(group, _INDICES, (0, n_layers, k), chunk, np.int32, _SLOT_DIMS, compress=True, inner=inner)
    create_array(group, _VALUES, (0, n_layers, k), chunk, np.float32, _SLOT_DIMS, compress=True, inner=inner)
    for name, dtype in TOKEN_DTYPES.items():
        create_array(group, name, (0,), (ct,), dtype, ("token",), compress=True)
    layer = create_array(group, _LAYER, (n_layers,), (n_layers,), np.int32, ("layer",), compress=False)
    writable(layer)[:] = np.asarray(meta.layers, dtype=np.int32)


@functools.lru_cache(maxsize=16)
def _layouts(record: str) -> dict[str, dict[str, Any]]:
    """The metadata `create_latents` writes for each array of a latents store with this record (JSON)."""
    meta = LatentsMeta.from_dict(json.loads(record), "")
    return array_layouts(lambda store: create_latents(store, meta))


class LatentChunk(NamedTuple):
    """Consecutive rows of a latents store from token `start`: indices [C, L, k] int32, values [C, L, k]
    float32 (post-ReLU, 0 = inactive slot), and the token arrays."""

    start: int
    indices: np.ndarray
    values: np.ndarray
    tokens: TokenRows


def check_rows(indices: np.ndarray, values: np.ndarray, n_latents: int) -> None:
    """Refuse rows of a latents store (indices and values [C, L, k]) whose values are not finite and >= 0, or whose
    active slots name a latent outside [0, n_latents): StoreError naming what to redo."""
    if not np.isfinite(values).all() or (values < 0).any():
        raise StoreError("latents `values` hold negative or non-finite activations (re-encode the store)")
    active = indices[values > 0]
    if active.size and (active.min() < 0 or active.max() >= n_latents):
        bad = int(active.min()) if active.min() < 0 else int(active.max())
        raise StoreError(
            f"latents `indices` hold latent {bad} at an active slot, outside [0, {n_latents}) (re-encode the store)"
        )


class LatentsWriter(ChunkCommitter[LatentChunk]):
    """Commits token chunks of latents in order; the caller holds the store lock (core.zarrstore.StoreTransaction)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta = read_latents_meta(path)
        self.group = zarr.open_group(str(path), mode="r+", zarr_format=3)

    def _write_data(self, start: int, rows: LatentChunk, derived: None) -> None:
        assert start % self.meta.chunk_tokens == 0 and start <= self.meta.n_tokens
        write_rows_at(self.group, start, {_INDICES: rows.indices, _VALUES: rows.values, **rows.tokens._asdict()})

    def _record(self, start: int, rows: LatentChunk, derived: None) -> None:
        self.set_meta(n_tokens=max(self.meta.n_tokens, start + len(rows.indices)))

    def set_meta(self, **changes: Any) -> None:
        self.meta = replace(self.meta, **changes)
        set_root_attribute(self.group, self.meta.to_dict())


class LatentArrays(NamedTuple):
    """The arrays the layer analyses read, dask-backed or in memory: indices, values [token, layer, k];
    trainable, sequence [token]; the block index of each layer."""

    indices: Any
    values: Any
    trainable: Any
    sequence: Any
    layers: tuple[int, ...]


class Latents:
    """Read access to a latents store; everything outside this module reads latents through it."""

    def __init__(self, path: Path | str, require_complete: bool = True) -> None:
        self.path = Path(path)
        self.meta = read_latents_meta(self.path)
        if require_complete and not self.meta.complete:
            raise unfinished(path, self.meta.n_tokens, self.meta.total_tokens, "tokens", "mlsae-analyze encode")
        self._group = open_checked(self.path, _ARRAYS, KIND)
        layouts = _layouts(json.dumps(self.meta.to_dict(), sort_keys=True))
        check_layout(self._group, self.path, layouts, {"token": self.n_tokens}, KIND)

    @property
    def n_tokens(self) -> int:
        return self.meta.n_tokens

    @property
    def layers(self) -> tuple[int, ...]:
        return self.meta.layers

    @property
    def n_latents(self) -> int:
        return self.meta.n_latents

    @property
    def chunk_tokens(self) -> int:
        return self.meta.chunk_tokens

    @property
    def read_tokens(self) -> int:
        """The fewest tokens a read of `indices` decodes: an inner chunk (version 2) or a whole chunk (version 1)."""
        return int(get_array(self._group, _INDICES).chunks[0])

    def tokens(self, start: int = 0, stop: int | None = None) -> TokenRows:
        """The token arrays of committed rows [start, stop) (default: all)."""
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        return TokenRows(*(read_array(self._group, name, slice(start, stop)) for name in TOKEN_DTYPES))

    def chunk(self, start: int, stop: int | None = None) -> LatentChunk:
        """Committed rows [start, stop) (default: one chunk's worth)."""
        stop = min(self.n_tokens, start + self.chunk_tokens if stop is None else stop)
        rows = slice(start, stop)
        return LatentChunk(
            start,
            read_array(self._group, _INDICES, rows),
            read_array(self._group, _VALUES, rows),
            self.tokens(start, stop),
        )

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, TokenRows]:
        """indices, values and the token arrays of committed `rows` (sorted, unique), one read per array: far
        faster than a read per run of rows when the rows are scattered (example windows)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.n_tokens):
            raise IndexError(f"rows outside [0, {self.n_tokens})")
        tokens = TokenRows(*(read_rows(self._group, name, rows) for name in TOKEN_DTYPES))
        return read_rows(self._group, _INDICES, rows), read_rows(self._group, _VALUES, rows), tokens

    def chunks(self, progress: Progress = no_progress) -> Iterator[LatentChunk]:
        """Every committed row, one stored chunk at a time; `progress` gets the tokens of each."""
        for start in range(0, self.n_tokens, self.chunk_tokens):
            chunk = self.chunk(start)
            yield chunk
            progress(len(chunk.indices))

    def arrays(self) -> LatentArrays:
        """The committed rows as dask arrays, one block per stored chunk."""
        import dask.array as da

        def read(name: str) -> Any:
            arr = get_array(self._group, name)
            blocks = (self.chunk_tokens, *arr.shape[1:])  # a stored chunk, not an inner chunk of version 2
            return da.from_zarr(str(self.path), component=name, chunks=blocks)[: self.n_tokens]

        return LatentArrays(read(_INDICES), read(_VALUES), read("trainable"), read("sequence"), self.layers)

    def to_xarray(self) -> Any:
        """The committed rows as a lazy xarray Dataset (dims token, layer, k)."""
        import xarray as xr

        data = xr.open_zarr(str(self.path), consolidated=False, chunks={"token": self.chunk_tokens})
        return data.isel(token=slice(0, self.n_tokens))

    def verify(self) -> int:
        """Checksum every committed chunk; CorruptError naming the first bad one. Returns the chunks checked."""
        return verify_group(self.path, self.n_tokens, self.chunk_tokens, arrays=_ARRAYS, kind=KIND)


def verify_latents(path: Path) -> Verified:
    """Check every committed chunk of the latents store at `path` (complete or not), for `mlsae-cache verify`."""
    latents = Latents(path, require_complete=False)
    notes = check_root_seal(read_root_attribute(path, KIND, ""), path, KIND)
    return Verified(KIND, latents.verify(), "chunks", tuple(notes))


def latent_arrays(data: Latents | LatentArrays | Any) -> LatentArrays:
    """The arrays of a latents store, of `LatentArrays` as given, or of an xarray Dataset holding the variables
    of the format (any origin, any chunking); StoreError naming what such a Dataset lacks."""
    if isinstance(data, LatentArrays):
        return data
    if isinstance(data, Latents):
        return data.arrays()
    expected = {_INDICES: _SLOT_DIMS, _VALUES: _SLOT_DIMS, "trainable": ("token",), "sequence": ("token",)}
    for name, dims in expected.items():
        if name not in data.variables:
            raise StoreError(f"latents Dataset has no variable {name!r} (pass a store written by encode)")
        if data[name].dims != dims:
            raise StoreError(f"latents variable {name!r} has dims {data[name].dims}, expected {dims}")
    layers = data.indexes[_LAYER].values if _LAYER in data.indexes else np.arange(data.sizes["layer"])
    indices, values, trainable, sequence = (data[name].data for name in expected)
    return LatentArrays(indices, values, trainable, sequence, tuple(int(b) for b in layers))
