"""The cache store, format `mlsae-cache` version 1: the only module that knows its array names and chunking.

Layout (a Zarr v3 group, every array with `dimension_names`):

    activations   (token, layer, d_model)  float16 | float32 | uint16 (bfloat16 bit patterns)
    token_ids     (token,)                 int32
    sequence      (token,)                 int64
    position      (token,)                 int32
    trainable     (token,)                 bool
    layer         (layer,)                 int32    block index of each stored layer
    layer_mean    (layer, d_model)         float64  mean over trainable tokens
    layer_sq_norm (layer,)                 float64  mean squared L2 norm over trainable tokens
    chunk_sum, chunk_sq_norm_sum, chunk_count  (token_chunk, ...)  float64 / int64
                  per token-chunk partial sums behind the two statistics

Chunks are `chunk_tokens` rows by one layer by the whole `d_model`: the shuffled trainer reads whole chunks in
random order, and one commit writes one row of chunks for every array (docs/FORMAT.md gives the measurements
behind the choice). Every chunk carries a crc32c checksum so `verify` finds a corrupted byte. Float activations
are stored uncompressed (real activations barely compress); bfloat16 bit patterns and the token arrays go
through zstd.

Commit protocol (core.zarrstore.ChunkCommitter), which makes a kill at any moment harmless: the data of token
chunk c is written first, then its partial statistics; then the two statistics arrays and the root attribute's
`n_tokens` (a single writer), or the shard's progress (a worker of a parallel harvest). Partial statistics per
chunk (rather than one running sum) make a re-written chunk idempotent and let shards merge exactly, in a fixed
order.

The statistics arrays' names and sums live in cachestats.py, part of this owner. Readers outside the two use
`Cache` (typed accessors: `tokens`, `trainable`, `activations`, `stored_chunk`, `to_xarray`, ...) and the
write-side records `Rows` and `TokenRows`; no other module spells an array name.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import zarr

from mlsae_cache.cachestats import (
    CHUNK_COUNT,
    CHUNK_SQ,
    CHUNK_SUM,
    LAYER_MEAN,
    LAYER_SQ_NORM,
    Partials,
    Totals,
    chunk_partials,
    read_partials,
    write_statistics,
)
from mlsae_cache.core.errors import InputError, StoreError
from mlsae_cache.core.paths import STORE_KINDS, what_is
from mlsae_cache.core.records import check_format
from mlsae_cache.core.verifying import Verified
from mlsae_cache.core.zarrstore import (
    ChunkCommitter,
    array_layouts,
    check_layout,
    check_root_seal,
    create_array,
    get_array,
    holds_nothing,
    open_checked,
    read_array,
    read_root_attribute,
    root_attributes,
    set_root_attribute,
    unfinished,
    verify_group,
    writable,
)
from mlsae_cache.policy import TrainablePolicy
from mlsae_cache.rawchunks import read_raw_chunk, write_raw_chunks
from mlsae_cache.storage import STORAGE_DTYPES, to_float32

FORMAT = "mlsae-cache"
VERSION = 1
KIND = "cache"

_ACTIVATIONS = "activations"
_LAYER = "layer"


class TokenRows(NamedTuple):
    """The per-token arrays of consecutive rows, each [n]; the same four arrays, under these names, are copied
    into every latents store."""

    token_ids: np.ndarray
    sequence: np.ndarray
    position: np.ndarray
    trainable: np.ndarray


TOKEN_DTYPES: dict[str, type[np.generic]] = {
    "token_ids": np.int32,
    "sequence": np.int64,
    "position": np.int32,
    "trainable": np.bool_,
}
"""Array name -> dtype of each TokenRows field, in field order."""

assert tuple(TOKEN_DTYPES) == TokenRows._fields

_PER_CHUNK = (CHUNK_SUM, CHUNK_SQ, CHUNK_COUNT)
"""The arrays along `token_chunk`: each chunk's partial sums."""
_ARRAYS = (_ACTIVATIONS, *TOKEN_DTYPES, _LAYER, LAYER_MEAN, LAYER_SQ_NORM, *_PER_CHUNK)
"""Every array of the format (a reader refuses a store missing one)."""


@dataclass(frozen=True)
class CacheMeta:
    """The root attribute `mlsae`. `n_tokens` rows are committed; readers use only those."""

    d_model: int
    layers: tuple[int, ...]
    model: dict[str, Any]
    dataset: dict[str, Any]
    context_length: int
    storage_dtype: str
    fingerprint: str
    chunk_tokens: int = 4096
    n_tokens: int = 0
    complete: bool = False
    exhausted: bool = False
    max_tokens: int | None = None
    batch_size: int = 0
    trainable_policy: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    hook: str = "resid_post"
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.storage_dtype not in STORAGE_DTYPES:
            raise StoreError(f"storage dtype {self.storage_dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
        if self.chunk_tokens < 1 or self.d_model < 1 or not self.layers:
            raise StoreError(f"invalid cache shape: chunk_tokens={self.chunk_tokens}, d_model={self.d_model}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | str = "") -> CacheMeta:
        check_format(data, FORMAT, VERSION, path, KIND, "re-harvest the cache")
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            kwargs["layers"] = tuple(kwargs["layers"])
            return cls(**kwargs)
        except (KeyError, TypeError) as e:
            raise StoreError(f"{path}: the cache's metadata is damaged ({e}); re-harvest the cache") from e

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def policy(self) -> TrainablePolicy:
        """The trainable-token policy the rows were marked with."""
        return TrainablePolicy.from_dict(self.trainable_policy)

    def covers(self, max_tokens: int | None) -> bool:
        """Complete with `max_tokens` rows (None: all the text), or with all the text there was."""
        return self.complete and (self.exhausted or (max_tokens is not None and self.n_tokens >= max_tokens))


def read_meta(path: Path | str) -> CacheMeta:
    """The metadata of the cache at `path`; NotFoundError / StoreError for anything that is not one."""
    attr = read_root_attribute(path, KIND, f"harvest one with `mlsae-cache harvest {path}`")
    meta = CacheMeta.from_dict(attr, path)
    check_root_seal(attr, path, KIND)
    return meta


def existing_cache(out: Path) -> CacheMeta | None:
    """The metadata of the cache at OUT, or None when OUT is absent or an empty directory.

    Anything else (a file, a foreign or damaged directory) is refused, and left untouched.
    """
    if holds_nothing(out) and not (out.exists() and not out.is_dir()):
        return None
    found = what_is(out)
    if found != STORE_KINDS[FORMAT]:
        raise StoreError(f"OUT {out} is {found}, not a cache to write (choose a new or empty directory for OUT)")
    return read_meta(out)


def create_store(path: Path | Any, meta: CacheMeta) -> None:
    """Create an empty cache (no rows) at `path` with every array of the format.

    The root attribute is written first, in the group's own creation: a creation cut short leaves a cache of
    0 committed rows, which `harvest` recreates, never a directory that looks foreign.
    """
    where = str(path) if isinstance(path, Path | str) else path
    group = zarr.create_group(where, zarr_format=3, attributes=root_attributes(meta.to_dict()))
    n_layers, d, ct = meta.n_layers, meta.d_model, meta.chunk_tokens
    act_dtype = STORAGE_DTYPES[meta.storage_dtype]
    dims = ("token", "layer", "d_model")
    bf16 = meta.storage_dtype == "bfloat16"
    create_array(group, _ACTIVATIONS, (0, n_layers, d), (ct, 1, d), act_dtype, dims, compress=bf16)
    for name, dtype in TOKEN_DTYPES.items():
        create_array(group, name, (0,), (ct,), dtype, ("token",), compress=True)
    layer = create_array(group, _LAYER, (n_layers,), (n_layers,), np.int32, ("layer",), compress=False)
    writable(layer)[:] = np.asarray(meta.layers, dtype=np.int32)
    create_array(group, LAYER_MEAN, (n_layers, d), (n_layers, d), np.float64, ("layer", "d_model"), False)
    create_array(group, LAYER_SQ_NORM, (n_layers,), (n_layers,), np.float64, ("layer",), False)
    per_chunk = ("token_chunk", "layer", "d_model")
    create_array(group, CHUNK_SUM, (0, n_layers, d), (1, n_layers, d), np.float64, per_chunk, False)
    create_array(group, CHUNK_SQ, (0, n_layers), (1, n_layers), np.float64, ("token_chunk", "layer"), False)
    create_array(group, CHUNK_COUNT, (0,), (1,), np.int64, ("token_chunk",), False)


@dataclass(frozen=True)
class Rows:
    """A block of consecutive token rows in the storage dtype.

    activations is layer-major, [n_layers, n, d_model]: every stored chunk (a token chunk at one layer) is then
    one contiguous slab, which halves the cost of writing it, and the hooks fill it layer by layer. `tokens`
    holds the per-token arrays, each [n].
    """

    activations: np.ndarray
    tokens: TokenRows

    def __len__(self) -> int:
        return int(self.tokens.token_ids.shape[0])

    def slice(self, start: int, stop: int) -> Rows:
        return Rows(self.activations[:, start:stop], TokenRows(*(a[start:stop] for a in self.tokens)))

    def token_major(self) -> np.ndarray:
        """activations as [n, n_layers, d_model] (a view), the layout of the stored array."""
        return self.activations.transpose(1, 0, 2)


def _open(path: Path, mode: Literal["r", "r+"]) -> zarr.Group:
    return zarr.open_group(str(path), mode=mode, zarr_format=3)


_GROWING = (_ACTIVATIONS, *TOKEN_DTYPES, *_PER_CHUNK)
"""The arrays that grow along their first axis: `token` (activations and token arrays), `token_chunk` (partials)."""


class CacheChunkWriter(ChunkCommitter[Rows]):
    """The data half of a cache commit: rows of one token chunk, then that chunk's partial sums. Subclasses make
    the chunk visible (`_record`). The caller holds the store lock (exclusive, or shared for shards).

    The growing arrays are opened once (zarr reads an array's metadata from its file at every lookup) and grown
    ahead of need, to twice their length, so that their metadata is rewritten a few times in a run rather than at
    every commit (per Pythia-70m-shaped chunk of 4,096 tokens, the lookups and resizes took 10 of the 44 ms of
    CPU a commit cost; measured). Arrays may so hold more rows than are committed, as the format allows; `trim`
    sets them to the committed rows at the end of a run.
    """

    def __init__(self, path: Path | str, direct_io: bool = True) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.group = _open(self.path, "r+")
        self.direct_io = direct_io
        self._arrays = {name: writable(get_array(self.group, name)) for name in _GROWING}

    def _at_least(self, name: str, rows: int) -> zarr.Array:
        """The array `name` holding at least `rows` rows (grown to max(rows, twice its length) if it is shorter)."""
        arr = self._arrays[name]
        if arr.shape[0] < rows:
            arr.resize((max(rows, 2 * arr.shape[0]), *arr.shape[1:]))
        return arr

    def derive(self, rows: Rows) -> Partials:
        """The chunk's partial sums (computed with torch's intra-op threads: the harvest calls this on the thread
        that runs the model, then commits on another)."""
        return chunk_partials(rows.activations, rows.tokens.trainable, self.meta.storage_dtype)

    def _write_data(self, start: int, rows: Rows, derived: Partials) -> None:
        """Write rows [start, start + len(rows)) filling token chunk start // chunk_tokens from its start, then
        that chunk's partial sums (shards run this side by side on disjoint chunks)."""
        ct = self.meta.chunk_tokens
        assert start % ct == 0 and 0 < len(rows) <= ct
        stop, chunk = start + len(rows), start // ct
        activations = self._at_least(_ACTIVATIONS, stop)
        if not write_raw_chunks(activations, chunk, rows.activations, direct=self.direct_io):
            activations[start:stop] = rows.token_major()
        for name, values in rows.tokens._asdict().items():
            self._at_least(name, stop)[start:stop] = values
        s, q, c = derived
        for name, value in ((CHUNK_SUM, s[None]), (CHUNK_SQ, q[None]), (CHUNK_COUNT, np.asarray([c]))):
            self._at_least(name, chunk + 1)[chunk : chunk + 1] = value

    def trim(self) -> None:
        """Set every growing array to the committed rows (`meta.n_tokens`), as a run's last step."""
        _resize_all(self._arrays, self.meta.n_tokens, self.meta.chunk_tokens)

    def set_meta(self, **changes: Any) -> None:
        """Replace fields of the root attribute (one atomic write of the group's zarr.json)."""
        self.meta = set_meta(self.group, self.meta, **changes)


def resize_store(group: zarr.Group, n_tokens: int, chunk_tokens: int) -> None:
    """Set the token extent of every token and token-chunk array (a parallel harvest sizes them up front, so its
    workers never rewrite array metadata, and trims them to what was written at the end)."""
    _resize_all({name: get_array(group, name) for name in _GROWING}, n_tokens, chunk_tokens)


def _resize_all(arrays: dict[str, zarr.Array], n_tokens: int, chunk_tokens: int) -> None:
    """Resize the growing `arrays` to `n_tokens` rows along `token`, the chunks they fill along `token_chunk`."""
    n_chunks = math.ceil(n_tokens / chunk_tokens)
    for name, arr in arrays.items():
        rows = n_chunks if name in _PER_CHUNK else n_tokens
        if arr.shape[0] != rows:
            arr.resize((rows, *arr.shape[1:]))


def set_meta(group: zarr.Group, meta: CacheMeta, **changes: Any) -> CacheMeta:
    """Replace fields of the root attribute (one atomic write of the group's zarr.json); the new metadata."""
    meta = replace(meta, **changes)
    set_root_attribute(group, meta.to_dict())
    return meta


class CacheWriter(CacheChunkWriter):
    """Appends rows to a cache, one token chunk per commit (a single writer: the caller holds the lock
    exclusively). A commit ends with the statistics and then `n_tokens`."""

    def __init__(self, path: Path | str, direct_io: bool = True) -> None:
        super().__init__(path, direct_io)
        # the totals of the committed chunks before the last one, and the last one's partials: a commit rewrites
        # the last chunk (when it is not full) or appends one, and reads no partial sums back
        n_chunks = math.ceil(self.meta.n_tokens / self.meta.chunk_tokens)
        self._before = Totals.read(self.group, max(n_chunks - 1, 0), self.meta.n_layers, self.meta.d_model)
        self._last_chunk = n_chunks - 1
        self._last: Partials | None = None
        if n_chunks:
            s, q, c = read_partials(self.group, n_chunks - 1, n_chunks)
            self._last = (s[0], q[0], int(c[0]))

    @property
    def resume_token(self) -> int:
        """First row to (re)write: the start of the first chunk that is not full."""
        return (self.meta.n_tokens // self.meta.chunk_tokens) * self.meta.chunk_tokens

    def _record(self, start: int, rows: Rows, derived: Partials) -> None:
        assert start <= self.meta.n_tokens
        chunk = start // self.meta.chunk_tokens
        assert chunk in (self._last_chunk, self._last_chunk + 1)
        if chunk == self._last_chunk + 1 and self._last is not None:
            self._before = self._before.add(*self._last)
        self._last_chunk, self._last = chunk, derived
        write_statistics(self.group, self._before.add(*derived))
        self.set_meta(n_tokens=max(start + len(rows), self.meta.n_tokens))


class Cache:
    """Read access to a cache; everything outside this module reads caches through it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self._group = open_checked(self.path, _ARRAYS, KIND)
        rows = {"token": self.n_tokens, "token_chunk": self.n_chunks}
        check_layout(self._group, self.path, _layouts(json.dumps(self.meta.to_dict(), sort_keys=True)), rows, KIND)
        self._activations: zarr.Array | None = None

    @property
    def n_tokens(self) -> int:
        return self.meta.n_tokens

    @property
    def layers(self) -> tuple[int, ...]:
        return self.meta.layers

    @property
    def d_model(self) -> int:
        return self.meta.d_model

    @property
    def chunk_tokens(self) -> int:
        return self.meta.chunk_tokens

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_tokens / self.chunk_tokens)

    def layer_index(self, layer: int) -> int:
        """The position of block `layer` among the stored layers; InputError when it is not stored."""
        if layer not in self.layers:
            raise InputError(f"block {layer} is not in cache {self.path} (it holds blocks {list(self.layers)})")
        return self.layers.index(layer)

    def token_range(self, start: int, stop: int | None) -> tuple[int, int]:
        """(start, stop) with stop None meaning the last committed token, and clipped to it."""
        return start, self.n_tokens if stop is None else min(stop, self.n_tokens)

    def tokens(self, start: int = 0, stop: int | None = None) -> TokenRows:
        """The per-token arrays of committed rows [start, stop) (default: all); only the chunks holding that
        range are read."""
        a, b = self.token_range(start, stop)
        return TokenRows(*(read_array(self._group, name, slice(a, b)) for name in TOKEN_DTYPES))

    def trainable(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Which committed rows [start, stop) are trainable: [n] bool."""
        a, b = self.token_range(start, stop)
        return read_array(self._group, "trainable", slice(a, b))

    def token_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The input token of committed rows [start, stop): [n] int32."""
        a, b = self.token_range(start, stop)
        return read_array(self._group, "token_ids", slice(a, b))

    def activations(self, start: int, stop: int, layer_index: int | slice = slice(None)) -> np.ndarray:
        """float32 activations of rows [start, stop) at layer position(s) `layer_index`."""
        a, b = self.token_range(start, stop)
        raw = read_array(self._group, _ACTIVATIONS, (slice(a, b), layer_index))
        return to_float32(raw, self.meta.storage_dtype)

    def chunk(self, chunk_index: int, layer_index: int) -> np.ndarray:
        """float32 rows of one stored chunk (token chunk, layer position): shape [<=chunk_tokens, d_model]."""
        return to_float32(self.stored_chunk(chunk_index, layer_index), self.meta.storage_dtype)

    def stored_chunk(self, chunk_index: int, layer_index: int) -> np.ndarray:
        """One stored chunk's committed rows as stored (bfloat16 as uint16 bit patterns; see storage.py),
        read-only (a mapping of the chunk's file, where rawchunks.py applies)."""
        start = chunk_index * self.chunk_tokens
        stop = min(start + self.chunk_tokens, self.n_tokens)
        if self._activations is None:
            self._activations = get_array(self._group, _ACTIVATIONS)
        raw = read_raw_chunk(self._activations, (chunk_index, layer_index, 0))
        if raw is not None:
            return raw.reshape(self.chunk_tokens, self.d_model)[: stop - start]
        return cast(np.ndarray, self._activations[start:stop, layer_index])

    def layer_mean(self) -> np.ndarray:
        """Mean over trainable tokens, per stored layer: [n_layers, d_model] float64."""
        return read_array(self._group, LAYER_MEAN)

    def layer_sq_norm(self) -> np.ndarray:
        """Mean squared L2 norm over trainable tokens, per stored layer: [n_layers] float64."""
        return read_array(self._group, LAYER_SQ_NORM)

    def to_xarray(self) -> Any:
        """The committed rows as a lazy xarray Dataset (bfloat16 bit patterns are left as stored)."""
        import xarray as xr

        ds = xr.open_zarr(str(self.path), consolidated=False)
        return ds.isel(token=slice(0, self.n_tokens))

    def dask_activations(self) -> Any:
        """The committed activations as a dask array [token, layer, d_model] in float32, one block per chunk."""
        import dask.array as da

        arr = da.from_zarr(str(self.path), component=_ACTIVATIONS)[: self.n_tokens]
        return arr.map_blocks(to_float32, self.meta.storage_dtype, dtype=np.float32)

    def nbytes_stored(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


@functools.lru_cache(maxsize=16)
def _layouts(record: str) -> dict[str, dict[str, Any]]:
    """The metadata `create_store` writes for each array of a cache with this record (JSON)."""
    meta = CacheMeta.from_dict(json.loads(record))
    return array_layouts(lambda store: create_store(store, meta))


def open_cache(path: Path | str, require_complete: bool = True) -> Cache:
    """The cache at `path` for reading; refuses one whose harvest has not finished (unless asked)."""
    cache = Cache(path)
    if require_complete and not cache.meta.complete:
        raise unfinished(path, cache.n_tokens, cache.meta.max_tokens, "tokens", "mlsae-cache harvest")
    return cache


def verify(path: Path | str) -> int:
    """Checksum every committed chunk of the cache at `path` (see core.zarrstore.verify_group)."""
    meta = Cache(path).meta  # opening it checks each array's metadata against the record
    return verify_group(path, meta.n_tokens, meta.chunk_tokens, arrays=_ARRAYS, kind=KIND)


def verify_cache(path: Path) -> Verified:
    """`verify` for `mlsae-cache verify`: the chunks checked, and a note when the root record carries no seal."""
    n = verify(path)
    attr = read_root_attribute(path, KIND, "")
    return Verified(KIND, n, "chunks", tuple(check_root_seal(attr, path, KIND)))
