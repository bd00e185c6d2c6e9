"""Activation chunks read and written straight from and to their files, bypassing zarr's codec pipeline, where
that gives exactly the bytes zarr reads and writes: full chunks of an uncompressed little-endian array with a
crc32c, on a local store (store.py falls back to zarr for everything else). Part of the format owner: the chunk
key comes from zarr's own metadata, and tests/cache/test_store.py compares both paths byte for byte.

The checksum is the same crc32c that zarr computes (with google-crc32c), from the `crc32c` package: measured
here 11 against 4.1 GB/s on one thread, and it releases the GIL, so the loader's reader threads and the harvest's
commit thread check chunks beside other Python work (google-crc32c holds the GIL throughout).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import sys
import uuid
from pathlib import Path

import crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.metadata import ArrayV3Metadata
from zarr.storage import LocalStore

from mlsae_cache.core.errors import CorruptError


def write_raw_chunks(arr: zarr.Array, chunk: int, layer_major: np.ndarray, direct: bool = True) -> bool:
    """Write token chunk `chunk` of the activations array `arr` straight to its chunk files, one per layer, where
    that gives the bytes zarr would write; False, writing nothing, where it does not (the caller uses zarr).

    Why by hand: zarr encodes a chunk by copying it into a new buffer with the checksum appended, which costs
    more CPU than the checksum and the file write together (measured: 0.25 vs 0.07-0.15 s per 4,096 SmolLM2
    tokens), CPU the forward pass needs. Only full chunks of an uncompressed little-endian array with a crc32c
    on a local store take this path. The file is written beside its final name and renamed, as zarr's own
    writes are. `direct`: write the values with O_DIRECT where possible (`_write_direct`); off, every write is
    buffered (the same bytes either way).
    """
    n_layers, n, _ = layer_major.shape
    if n != arr.chunks[0] or _raw_chunk_path(arr, (chunk, 0, 0)) is None:
        return False
    for layer in range(n_layers):
        data = np.ascontiguousarray(layer_major[layer]).reshape(-1).view(np.uint8)
        checksum = np.uint32(crc32c.crc32c(data)).tobytes()  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only from Python 3.12
        path = _raw_chunk_path(arr, (chunk, layer, 0))
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            if not (direct and _write_direct(partial, data, checksum)):
                with open(partial, "wb") as f:
                    f.write(data)  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only from Python 3.12
                    f.write(checksum)
            os.replace(partial, path)
        except OSError:  # a full disk, say: its space is given back at once
            partial.unlink(missing_ok=True)
            raise
    return True


DIRECT_ALIGN = 4096
"""Address and size alignment that O_DIRECT writes need (a multiple of any disk's logical block size)."""


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised array whose data starts on a DIRECT_ALIGN boundary (so its slabs can be written with
    O_DIRECT, see `_write_direct`)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + DIRECT_ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % DIRECT_ALIGN
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def _write_direct(path: Path, data: np.ndarray, checksum: bytes) -> bool:
    """Write `data` then `checksum` to the new file `path` with the data bypassing the page cache (O_DIRECT), where
    the platform, the file system and the data's alignment allow it; False, having written nothing, elsewhere.

    Why: a buffered write copies every byte into page-cache pages that the kernel must first find, map and
    account; on this project's 2-core VM that copy ran at 0.3-0.5 GB/s and took as much CPU as the rest of a
    harvest commit, CPU the forward pass needs, where the disk takes the O_DIRECT write at 1.9 GB/s with no CPU
    to speak of. The pages are then not cached: a reader soon after reads them from the disk.
    """
    if not hasattr(os, "O_DIRECT") or data.ctypes.data % DIRECT_ALIGN or data.nbytes % DIRECT_ALIGN:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    except OSError:  # a file system without O_DIRECT (tmpfs, some network ones)
        return False
    try:
        with memoryview(data) as view:  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only from Python 3.12
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)  # the 4 bytes, buffered
        os.write(fd, checksum)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        if e.errno == errno.EINVAL:  # alignment the device wants beyond DIRECT_ALIGN: write it buffered
            return False
        raise
    os.close(fd)
    return True


def _raw_chunk_path(arr: zarr.Array, coords: tuple[int, ...]) -> Path | None:
    """The file of chunk `coords` where its bytes are the raw little-endian values plus a crc32c, else None."""
    assert isinstance(arr.metadata, ArrayV3Metadata)  # every mlsae store is Zarr v3
    plain = arr.metadata.codecs == (BytesCodec(endian="little"), Crc32cCodec())
    if not (plain and isinstance(arr.store, LocalStore) and sys.byteorder == "little"):
        return None
    return Path(arr.store.root) / arr.path / arr.metadata.encode_chunk_key(coords)


def read_raw_chunk(arr: zarr.Array, coords: tuple[int, ...]) -> np.ndarray | None:
    """The whole chunk `coords` of `arr`, flat and read-only, checked against its crc32c, mapped straight from its
    file; None where that path does not apply (the caller reads through zarr).

    Why by hand: zarr decodes a chunk through two more copies than one read (measured on the demo cache: 0.6-1.4 M
    against 2.1-2.9 M rows/s, 2-3x the CPU), and the trainer's loader reads every row this way. Why mapped: the
    file's pages are already in the page cache, so a read would only copy them into fresh memory that the kernel
    must first zero (measured on 1 M demo-cache rows: 0.29 s of CPU mapped against 0.86 s read). The file is
    replaced by rename, never rewritten in place, so the mapping keeps the checked bytes; the size is checked
    before the mapping, so no access can fall beyond the end of the file.
    """
    path = _raw_chunk_path(arr, coords)
    if path is None:
        return None
    size = int(np.prod(arr.chunks)) * arr.dtype.itemsize
    corrupt = CorruptError(f"chunk {path} is corrupted (checksum mismatch or wrong size); re-create the cache")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != size + 4:
                raise corrupt
            buf = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
    except FileNotFoundError:
        return None  # zarr gives the fill value, or (under verify) reports it missing
    if np.uint32(crc32c.crc32c(buf[:-4])).tobytes() != buf[-4:].tobytes():  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only from Python 3.12
        raise corrupt
    return buf[:-4].view(arr.dtype)
