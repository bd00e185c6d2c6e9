"""The latents store, format `mlsae-latents` version 1 (SPEC section 7): the only module that knows its names.

    indices   (token, layer, k)  int32    top-k latent ids of each (token, layer) row
    values    (token, layer, k)  float32  their post-ReLU activations (0 = inactive slot)
    token_ids, sequence, position, trainable (token,), layer (layer,)  copied from the cache

Chunks hold `chunk_tokens` tokens with all layers and all k slots (one chunk per token chunk of the cache), with
zstd and a crc32c checksum. Rows are committed as in the cache: data first, then `n_tokens` in the root attribute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mlsae_cache.errors import StoreError
from mlsae_cache.store import (
    ATTR,
    TOKEN_ARRAYS,
    check_format,
    create_array,
    read_root_attribute,
    remove_partials,
    writable,
    write_rows_at,
)

FORMAT = "mlsae-latents"
VERSION = 1


@dataclass(frozen=True)
class LatentsMeta:
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
        check_format(data, FORMAT, VERSION, path, "latents store", "re-run `mlsae-analyze encode`")
        kwargs = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        kwargs["layers"] = tuple(kwargs["layers"])
        return cls(**kwargs)


def read_latents_meta(path: Path | str) -> LatentsMeta:
    attr = read_root_attribute(path, "latents store", "give the OUT of `mlsae-analyze encode`")
    return LatentsMeta.from_dict(attr, path)


def create_latents(path: Path, meta: LatentsMeta) -> None:
    """An empty latents store; the root attribute is written with the group (a cut creation has 0 rows)."""
    group = zarr.create_group(str(path), zarr_format=3, attributes={ATTR: meta.to_dict()})
    n_layers, ct = len(meta.layers), meta.chunk_tokens
    dims = ("token", "layer", "k")
    create_array(group, "indices", (0, n_layers, meta.k), (ct, n_layers, meta.k), np.int32, dims, compress=True)
    create_array(group, "values", (0, n_layers, meta.k), (ct, n_layers, meta.k), np.float32, dims, compress=True)
    for name, dtype in TOKEN_ARRAYS.items():
        create_array(group, name, (0,), (ct,), dtype, ("token",), compress=True)
    create_array(group, "layer", (n_layers,), (n_layers,), np.int32, ("layer",), compress=False)
    writable(group["layer"])[:] = np.asarray(meta.layers, dtype=np.int32)


class LatentsWriter:
    """Commits token chunks of latents in order; the caller holds the store lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta = read_latents_meta(path)
        remove_partials(self.path)
        self.group = zarr.open_group(str(path), mode="r+", zarr_format=3)

    def write_chunk(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Rows [start, start + n) of indices, values and the token arrays, then the commit."""
        assert start % self.meta.chunk_tokens == 0 and start <= self.meta.n_tokens
        write_rows_at(self.group, start, arrays)
        self.set_meta(n_tokens=max(self.meta.n_tokens, start + len(arrays["indices"])))

    def set_meta(self, **changes: Any) -> None:
        self.meta = replace(self.meta, **changes)
        self.group.attrs[ATTR] = self.meta.to_dict()


def open_latents(path: Path | str, require_complete: bool = True) -> tuple[Any, LatentsMeta]:
    """The committed rows as a lazy xarray Dataset (dask-backed, chunked as stored), and the metadata."""
    import xarray as xr

    meta = read_latents_meta(path)
    if require_complete and not meta.complete:
        raise StoreError(
            f"latents store {path} is incomplete ({meta.n_tokens} of {meta.total_tokens} tokens); "
            "finish it by re-running the same `mlsae-analyze encode` command"
        )
    ds = xr.open_zarr(str(path), consolidated=False).isel(token=slice(0, meta.n_tokens))
    return ds, meta
