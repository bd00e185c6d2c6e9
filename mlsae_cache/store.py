"""The cache store, format version 1 (SPEC section 5): the only module that knows array names and chunking.

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

Chunks are `chunk_tokens` rows by one layer by the whole `d_model` (4096 x 1 x 576 for SmolLM2 is 4.7 MB in
float16): the shuffled trainer reads whole chunks in random order (FACTS.md), and one commit writes one row of
chunks for every array. Every chunk carries a crc32c checksum so `verify` finds a corrupted byte. Float
activations are stored uncompressed (real activations compress by 0-8%); bfloat16 bit patterns and the token
arrays go through zstd.

Commit protocol, which makes a kill at any moment harmless: data of token chunk c is written first, then its
partial statistics, then the two statistics arrays, and only then the root attribute `n_tokens` moves. Partial
statistics per chunk (rather than one running sum) make a re-written chunk idempotent and let shards merge
exactly, in a fixed order.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from mlsae_cache.errors import CorruptError, NotFoundError, StoreError
from mlsae_cache.rawchunks import read_raw_chunk, write_raw_chunks

FORMAT = "mlsae-cache"
VERSION = 1
ATTR = "mlsae"
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
TOKEN_ARRAYS = {"token_ids": np.int32, "sequence": np.int64, "position": np.int32, "trainable": np.bool_}


@dataclass(frozen=True)
class CacheMeta:
    """The root attribute `mlsae` (SPEC section 5). `n_tokens` rows are committed; readers use only those."""

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
        check_format(data, FORMAT, VERSION, path, "cache", "re-harvest the cache")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["layers"] = tuple(kwargs["layers"])
        return cls(**kwargs)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def covers(self, max_tokens: int | None) -> bool:
        """Complete with `max_tokens` rows (None: all the text), or with all the text there was."""
        return self.complete and (self.exhausted or (max_tokens is not None and self.n_tokens >= max_tokens))


def check_format(data: dict[str, Any], fmt: str, version: int, path: Path | str, kind: str, remake: str) -> None:
    """Refuse a root attribute of another format, or of a version this mlsae does not read."""
    if data.get("format") != fmt:
        raise StoreError(f"{path} is not an mlsae {kind} (format {data.get('format')!r}; expected {fmt!r})")
    if data.get("version") != version:
        raise StoreError(
            f"{path} is an mlsae {kind} of format version {data.get('version')!r}, but this mlsae reads "
            f"version {version} (upgrade mlsae, or {remake})"
        )


def read_root_attribute(path: Path | str, kind: str, hint: str) -> dict[str, Any]:
    """The `mlsae` root attribute of the store at `path`; NotFoundError / StoreError naming `kind` otherwise."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{kind} {path} does not exist ({hint})")
    meta_file = path / "zarr.json"
    if not path.is_dir() or not meta_file.is_file():
        raise StoreError(f"{path} is not an mlsae {kind} (no zarr.json; {hint})")
    try:
        attrs = json.loads(meta_file.read_text()).get("attributes", {})
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}/zarr.json is unreadable ({e}); the store is damaged") from e
    if ATTR not in attrs:
        raise StoreError(f"{path} is a Zarr group but not an mlsae {kind} (no '{ATTR}' attribute; {hint})")
    return attrs[ATTR]


def read_meta(path: Path | str) -> CacheMeta:
    """The metadata of the cache at `path`; NotFoundError / StoreError for anything that is not one."""
    attr = read_root_attribute(path, "cache", f"harvest one with `mlsae-cache harvest {path}`")
    return CacheMeta.from_dict(attr, path)


def holds_nothing(path: Path) -> bool:
    """True when `path` is absent, or a directory holding nothing but the `.partial` files of writes that a kill
    cut short (a store whose creation was killed while writing its first file): a writer may start afresh."""
    path = Path(path)
    return not path.is_dir() or all(child.name.endswith(".partial") for child in path.iterdir())


def existing_cache(out: Path) -> CacheMeta | None:
    """The metadata of the cache at OUT, or None when OUT is absent or an empty directory.

    Anything else (a file, a foreign or damaged directory) is refused, and left untouched.
    """
    if out.exists() and not out.is_dir():
        raise StoreError(f"OUT {out} is a file, not a cache directory (choose another path)")
    if holds_nothing(out):
        return None
    try:
        return read_meta(out)
    except StoreError as e:
        raise StoreError(
            f"OUT {out} is a non-empty directory that is not an mlsae cache ({e}); choose a new or empty directory"
        ) from e


def clear_store(path: Path) -> None:
    """Remove everything inside the directory `path`, keeping the directory (whose lock the caller holds)."""
    for child in Path(path).iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def remove_partials(path: Path) -> None:
    """Delete the `*.partial` files of writes that a kill cut short (zarr and rawchunks.py write each file beside
    its name and rename it into place). Only a writer holding the store lock exclusively may call this: a running
    writer's files look the same."""
    for partial in Path(path).rglob("*.partial"):
        partial.unlink(missing_ok=True)


def discard_store(path: Path, keep_dir: bool) -> None:
    """Remove a store this run created and could not fill, so nothing half-written is left behind."""
    clear_store(path)
    if not keep_dir:
        Path(path).rmdir()


def _compressors(dtype: np.dtype, compress: bool) -> list[Any]:
    codecs: list[Any] = []
    if compress:
        codecs.append(BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=np.dtype(dtype).itemsize))
    codecs.append(Crc32cCodec())
    return codecs


def writable(arr: zarr.Array) -> zarr.Array:
    """`arr` set to store every chunk it is given. By default zarr skips (and deletes) a chunk equal to the fill
    value, 0 here: a chunk of zeros, such as `sequence` of a first window longer than a chunk, `chunk_count` of
    a chunk with no trainable token, or `layer` of a cache of block 0 alone, would then look missing to
    `verify`."""
    return arr.with_config({"write_empty_chunks": True})


def create_array(
    group: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: Any,
    dims: tuple[str, ...],
    compress: bool,
) -> None:
    """An array of the store conventions: fill 0, named dims, crc32c on every chunk (zstd first if `compress`)."""
    group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=0,
        dimension_names=dims,
        compressors=_compressors(np.dtype(dtype), compress),
    )


def create_store(path: Path, meta: CacheMeta) -> None:
    """Create an empty cache (no rows) at `path` with every array of the format.

    The root attribute is written first, in the group's own creation: a creation cut short leaves a cache of
    0 committed rows, which `harvest` recreates, never a directory that looks foreign.
    """
    group = zarr.create_group(str(path), zarr_format=3, attributes={ATTR: meta.to_dict()})
    n_layers, d, ct = meta.n_layers, meta.d_model, meta.chunk_tokens
    act_dtype = STORAGE_DTYPES[meta.storage_dtype]
    create_array(
        group,
        "activations",
        (0, n_layers, d),
        (ct, 1, d),
        act_dtype,
        ("token", "layer", "d_model"),
        compress=meta.storage_dtype == "bfloat16",
    )
    for name, dtype in TOKEN_ARRAYS.items():
        create_array(group, name, (0,), (ct,), dtype, ("token",), compress=True)
    create_array(group, "layer", (n_layers,), (n_layers,), np.int32, ("layer",), compress=False)
    writable(group["layer"])[:] = np.asarray(meta.layers, dtype=np.int32)
    create_array(group, "layer_mean", (n_layers, d), (n_layers, d), np.float64, ("layer", "d_model"), False)
    create_array(group, "layer_sq_norm", (n_layers,), (n_layers,), np.float64, ("layer",), False)
    create_array(
        group, "chunk_sum", (0, n_layers, d), (1, n_layers, d), np.float64, ("token_chunk", "layer", "d_model"), False
    )
    create_array(group, "chunk_sq_norm_sum", (0, n_layers), (1, n_layers), np.float64, ("token_chunk", "layer"), False)
    create_array(group, "chunk_count", (0,), (1,), np.int64, ("token_chunk",), False)


@dataclass(frozen=True)
class Rows:
    """A block of consecutive token rows in the storage dtype.

    activations is layer-major, [n_layers, n, d_model]: every stored chunk (a token chunk at one layer) is then
    one contiguous slab, which halves the cost of writing it (measured: 0.18 vs 0.41 s per 4,096 SmolLM2
    tokens), and the hooks fill it layer by layer. The token arrays are [n].
    """

    activations: np.ndarray
    token_ids: np.ndarray
    sequence: np.ndarray
    position: np.ndarray
    trainable: np.ndarray

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def slice(self, start: int, stop: int) -> Rows:
        tokens = {f: getattr(self, f)[start:stop] for f in TOKEN_ARRAYS}
        return Rows(activations=self.activations[:, start:stop], **tokens)

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        tokens = {f: np.concatenate([getattr(p, f) for p in parts]) for f in TOKEN_ARRAYS}
        return Rows(activations=np.concatenate([p.activations for p in parts], axis=1), **tokens)

    def token_major(self) -> np.ndarray:
        """activations as [n, n_layers, d_model] (a view), the layout of the stored array."""
        return self.activations.transpose(1, 0, 2)


def to_float32(stored: np.ndarray, storage_dtype: str) -> np.ndarray:
    """Stored activations as float32 (bfloat16 bit patterns are widened exactly)."""
    if storage_dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)


def stored_to_torch(stored: np.ndarray, storage_dtype: str) -> Any:
    """Stored activations as a torch tensor of their real dtype (bfloat16 bit patterns are viewed, not copied)."""
    import torch

    tensor = torch.from_numpy(stored)
    return tensor.view(torch.bfloat16) if storage_dtype == "bfloat16" else tensor


PARTIAL_ROWS = 128
"""Rows widened to float64 at a time by `chunk_partials` (a block that stays in the CPU's cache)."""


def chunk_partials(rows: Rows, storage_dtype: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Float64 sums over trainable rows: sum x [n_layers, d_model], sum ||x||^2 [n_layers], count.

    Layer by layer and PARTIAL_ROWS rows at a time, widened into one small float64 buffer, so no float64 copy of
    a layer is made (measured: 0.10 s per 4,096 SmolLM2 tokens against 0.18 s for whole layers). Excluded rows
    are zeroed rather than selected out (a boolean gather costs more than everything else here). numpy widens
    with SIMD and sums single-threaded, so the bits do not depend on the machine's thread count (shards and
    resumed runs write the same partials).
    """
    excluded = ~rows.trainable
    n_layers, n, d_model = rows.activations.shape
    sums, sq = np.zeros((n_layers, d_model)), np.zeros(n_layers)
    buf = np.empty((min(n, PARTIAL_ROWS), d_model))
    for i in range(n_layers):
        for a in range(0, n, PARTIAL_ROWS):
            x, stored = buf[: min(PARTIAL_ROWS, n - a)], rows.activations[i, a : a + PARTIAL_ROWS]
            np.copyto(x, to_float32(stored, storage_dtype) if storage_dtype == "bfloat16" else stored)
            x[excluded[a : a + PARTIAL_ROWS]] = 0.0
            sums[i] += x.sum(axis=0)
            sq[i] += np.einsum("nd,nd->", x, x)
    return sums, sq, int(rows.trainable.sum())


def write_rows_at(group: zarr.Group, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Write each array's rows at [start, start + n) along its first axis, growing the array first if needed."""
    for name, values in arrays.items():
        arr = writable(group[name])
        stop = start + values.shape[0]
        if arr.shape[0] < stop:
            arr.resize((stop, *arr.shape[1:]))
        arr[start:stop] = values


def write_chunk_data(group: zarr.Group, meta: CacheMeta, start: int, rows: Rows) -> tuple[np.ndarray, np.ndarray, int]:
    """Write rows [start, start + len(rows)) filling token chunk start // chunk_tokens from its start, then
    that chunk's partial sums, which it returns: the part of a commit that touches only this chunk's keys
    (shards run it side by side on disjoint chunks)."""
    ct = meta.chunk_tokens
    assert start % ct == 0 and 0 < len(rows) <= ct
    activations = writable(group["activations"])
    if activations.shape[0] < start + len(rows):
        activations.resize((start + len(rows), *activations.shape[1:]))
    if not write_raw_chunks(activations, start // ct, rows.activations):
        activations[start : start + len(rows)] = rows.token_major()
    write_rows_at(group, start, {name: getattr(rows, name) for name in TOKEN_ARRAYS})
    s, q, c = chunk_partials(rows, meta.storage_dtype)
    write_rows_at(
        group, start // ct, {"chunk_sum": s[None], "chunk_sq_norm_sum": q[None], "chunk_count": np.asarray([c])}
    )
    return s, q, c


def read_partials(group: zarr.Group, n_chunks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored partial sums of the first `n_chunks` token chunks."""
    return group["chunk_sum"][:n_chunks], group["chunk_sq_norm_sum"][:n_chunks], group["chunk_count"][:n_chunks]


def write_statistics(group: zarr.Group, sums: np.ndarray, sq: np.ndarray, counts: np.ndarray) -> None:
    """layer_mean and layer_sq_norm from per-chunk partial sums [chunk, ...], summed in chunk order (so a cache
    written in one run, several, or shards gets the same bits)."""
    count = int(counts.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums.sum(axis=0) / count if count else np.full(sums.shape[1:], np.nan)
        sq_norm = sq.sum(axis=0) / count if count else np.full(sq.shape[1:], np.nan)
    writable(group["layer_mean"])[:] = mean
    writable(group["layer_sq_norm"])[:] = sq_norm


def resize_store(group: zarr.Group, n_tokens: int, chunk_tokens: int) -> None:
    """Set the token extent of every token and token-chunk array (a sharded harvest sizes them up front, so its
    workers never rewrite array metadata, and trims them to what was written at the end)."""
    n_chunks = math.ceil(n_tokens / chunk_tokens)
    for name in ("activations", *TOKEN_ARRAYS):
        group[name].resize((n_tokens, *group[name].shape[1:]))
    for name in ("chunk_sum", "chunk_sq_norm_sum", "chunk_count"):
        group[name].resize((n_chunks, *group[name].shape[1:]))


def set_meta(group: zarr.Group, meta: CacheMeta, **changes: Any) -> CacheMeta:
    """Replace fields of the root attribute (one atomic write of the group's zarr.json); the new metadata."""
    meta = replace(meta, **changes)
    group.attrs[ATTR] = meta.to_dict()
    return meta


class CacheWriter:
    """Appends rows to a cache, one token chunk per commit. The caller holds the store lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        remove_partials(self.path)
        self.group = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        # the committed chunks' partial sums, kept in memory so each commit reads none of them back
        self._sums, self._sq, self._counts = read_partials(
            self.group, math.ceil(self.meta.n_tokens / self.meta.chunk_tokens)
        )

    @property
    def resume_token(self) -> int:
        """First row to (re)write: the start of the first chunk that is not full."""
        return (self.meta.n_tokens // self.meta.chunk_tokens) * self.meta.chunk_tokens

    def write_chunk(self, start: int, rows: Rows) -> None:
        """Commit rows [start, start + len(rows)) that fill token chunk start // chunk_tokens from its start."""
        assert start <= self.meta.n_tokens
        s, q, c = write_chunk_data(self.group, self.meta, start, rows)
        chunk = start // self.meta.chunk_tokens
        self._sums = np.concatenate([self._sums[:chunk], s[None]])
        self._sq = np.concatenate([self._sq[:chunk], q[None]])
        self._counts = np.concatenate([self._counts[:chunk], [c]])
        write_statistics(self.group, self._sums, self._sq, self._counts)
        self.set_meta(n_tokens=max(start + len(rows), self.meta.n_tokens))

    def set_meta(self, **changes: Any) -> None:
        """Replace fields of the root attribute (one atomic write of the group's zarr.json)."""
        self.meta = set_meta(self.group, self.meta, **changes)


class Cache:
    """Read access to a cache; everything outside this module reads caches through it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self._group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
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

    def token_array(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """One of token_ids, sequence, position, trainable over committed rows [start, stop) (default: all);
        only the chunks holding that range are read."""
        if name not in TOKEN_ARRAYS:
            raise KeyError(name)
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        return self._group[name][start:stop]

    def activations(self, start: int, stop: int, layer_index: int | slice = slice(None)) -> np.ndarray:
        """float32 activations of rows [start, stop) at layer position(s) `layer_index`."""
        stop = min(stop, self.n_tokens)
        raw = self._group["activations"][start:stop, layer_index]
        return to_float32(raw, self.meta.storage_dtype)

    def chunk(self, chunk_index: int, layer_index: int) -> np.ndarray:
        """float32 rows of one stored chunk (token chunk, layer position): shape [<=chunk_tokens, d_model]."""
        return to_float32(self.stored_chunk(chunk_index, layer_index), self.meta.storage_dtype)

    def stored_chunk(self, chunk_index: int, layer_index: int) -> np.ndarray:
        """One stored chunk's committed rows as stored (bfloat16 as uint16 bit patterns; see stored_to_torch),
        read-only (a mapping of the chunk's file, where rawchunks.py applies)."""
        start = chunk_index * self.chunk_tokens
        stop = min(start + self.chunk_tokens, self.n_tokens)
        if self._activations is None:
            self._activations = self._group["activations"]
        raw = read_raw_chunk(self._activations, (chunk_index, layer_index, 0))
        if raw is not None:
            return raw.reshape(self.chunk_tokens, self.d_model)[: stop - start]
        return self._activations[start:stop, layer_index]

    def layer_mean(self) -> np.ndarray:
        return self._group["layer_mean"][:]

    def layer_sq_norm(self) -> np.ndarray:
        return self._group["layer_sq_norm"][:]

    def to_xarray(self) -> Any:
        """The committed rows as a lazy xarray Dataset (bfloat16 bit patterns are left as stored)."""
        import xarray as xr

        ds = xr.open_zarr(str(self.path), consolidated=False)
        return ds.isel(token=slice(0, self.n_tokens))

    def dask_activations(self) -> Any:
        """The committed activations as a dask array [token, layer, d_model] in float32, one block per chunk."""
        import dask.array as da

        arr = da.from_zarr(str(self.path), component="activations")[: self.n_tokens]
        return arr.map_blocks(to_float32, self.meta.storage_dtype, dtype=np.float32)

    def nbytes_stored(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def _chunk_keys(arr: zarr.Array, n_rows: int) -> Iterator[tuple[str, tuple[slice, ...]]]:
    """(store key, selection) of every chunk holding the first `n_rows` rows of `arr`."""
    extent = (n_rows, *arr.shape[1:])
    for coords in np.ndindex(*(math.ceil(s / c) for s, c in zip(extent, arr.chunks, strict=False))):
        sel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, arr.chunks, strict=False))
        yield f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}", sel


def verify_group(path: Path | str, n_tokens: int, chunk_tokens: int) -> int:
    """Read and checksum every chunk holding committed data of the store at `path`: arrays along `token` up to
    n_tokens rows, along `token_chunk` up to the chunks those rows fill, others whole.

    CorruptError names the first missing or corrupted chunk; returns the number of chunks checked.
    """
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    checked = 0
    for _, arr in sorted(group.arrays()):
        dims = arr.metadata.dimension_names or ()
        n_rows = {"token": n_tokens, "token_chunk": math.ceil(n_tokens / chunk_tokens)}.get(
            (dims or ("",))[0], arr.shape[0]
        )
        for key, sel in _chunk_keys(arr, n_rows):
            if not asyncio.run(group.store.exists(key)):
                raise CorruptError(f"chunk {key} of {path} is missing (re-create the store, or resume its writer)")
            try:
                arr[sel]
            except Exception as e:  # zarr raises ValueError for a checksum mismatch, others for bad bytes
                raise CorruptError(f"chunk {key} of {path} is corrupted ({e}); re-create it") from e
            checked += 1
    return checked


def verify(path: Path | str) -> int:
    """Checksum every committed chunk of the cache at `path` (see verify_group)."""
    meta = read_meta(path)
    return verify_group(path, meta.n_tokens, meta.chunk_tokens)
