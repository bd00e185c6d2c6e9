"""What every mlsae Zarr store shares, whatever its format: the `mlsae` root attribute, array conventions (fill 0,
named dims, a crc32c on every chunk, every chunk stored), the commit protocol, the writer's transaction, and
verification. The formats themselves (names, dims, dtypes, chunking) live with their owners: `mlsae_cache.store`
(caches), `mlsae_analyze.latents` (latents), `mlsae_analyze.explorer.index` (explorer indexes).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.metadata import ArrayV3Metadata

from mlsae_cache.core.boundary import library_cause
from mlsae_cache.core.checksums import check_seal, seal
from mlsae_cache.core.errors import CorruptError, Interrupted, LockedError, MlsaeError, NotFoundError, StoreError
from mlsae_cache.core.lock import StoreLock
from mlsae_cache.core.outputs import full_disk_error
from mlsae_cache.core.paths import STORE_KINDS, SWAPPED, is_mlsae, what_is

ATTR = "mlsae"
"""The root attribute holding a store's metadata record."""


def read_root_attribute(path: Path | str, kind: str, hint: str) -> dict[str, Any]:
    """The `mlsae` root attribute of the store at `path`; NotFoundError / StoreError naming `kind` and what `path`
    is instead otherwise (with `hint` for how to make one, or a word on the arguments' order)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{kind} {path} does not exist ({hint})")
    meta_file = path / "zarr.json"
    if not path.is_dir() or not meta_file.is_file():
        found = what_is(path)
        raise StoreError(f"{path} is {found}, not an mlsae {kind} ({SWAPPED if is_mlsae(found) else hint})")
    try:
        attrs = json.loads(meta_file.read_text()).get("attributes", {})
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}/zarr.json is unreadable ({e}); the store is damaged") from e
    if not isinstance(attrs, dict) or not isinstance(attrs.get(ATTR), dict):
        raise StoreError(f"{path} is a Zarr group but not an mlsae {kind} (no '{ATTR}' attribute; {hint})")
    record = attrs[ATTR]
    if record.get("format") in STORE_KINDS and STORE_KINDS[record["format"]] != f"an mlsae {kind}":
        raise StoreError(f"{path} is {STORE_KINDS[record['format']]}, not an mlsae {kind} ({SWAPPED})")
    return record


PROBE_WAIT_S = 1.0
"""How long a writer retries a lock that is taken: a reader asking `being_written` holds it for an instant, and a
writer starting at that instant must not be refused."""


def being_written(path: Path | str) -> bool:
    """Whether a writer holds the store's lock now (a harvest, its workers, an encode). The probe takes the lock
    for an instant; a writer starting then waits for it (PROBE_WAIT_S)."""
    try:
        with StoreLock(Path(path)):
            return False
    except LockedError:
        return True


def unfinished(path: Path | str, committed: int, total: int | None, unit: str, command: str) -> StoreError:
    """The refusal of a store whose writer has not finished: still running, or stopped."""
    of = f" of {total:,}" if total else ""
    if being_written(path):
        return StoreError(f"{path} is being written now ({committed:,}{of} {unit} so far); wait for it to finish")
    return StoreError(
        f"{path} is incomplete ({committed:,}{of} {unit} committed): its writer stopped; finish it by re-running the "
        f"same `{command}` command"
    )


def set_root_attribute(group: zarr.Group, record: dict[str, Any]) -> None:
    """Replace the root attribute, sealed with its crc32c: one atomic rewrite of the group's zarr.json (the last
    step of a commit)."""
    group.attrs[ATTR] = seal(record)


def root_attributes(record: dict[str, Any]) -> dict[str, Any]:
    """The attributes of a new store's group: its record, sealed (give to zarr.create_group)."""
    return {ATTR: seal(record)}


def check_root_seal(record: dict[str, Any], path: Path | str, kind: str) -> list[str]:
    """CorruptError when the root attribute `record` of the store at `path` (its format and version already
    accepted) does not match its seal; a note when it has none (a store written before records were sealed)."""
    meta_file = Path(path) / "zarr.json"
    if check_seal(record, meta_file, f"the {kind} is damaged: re-create it"):
        return []
    return [
        f"{meta_file} carries no crc32c of its record (an older {kind}): its values were checked for consistency only"
    ]


def holds_nothing(path: Path) -> bool:
    """True when `path` is absent, or a directory holding nothing but the `.partial` files of writes that a kill
    cut short (a store whose creation was killed while writing its first file): a writer may start afresh."""
    path = Path(path)
    return not path.is_dir() or all(child.name.endswith(".partial") for child in path.iterdir())


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


def _compressors(dtype: np.dtype, compress: bool) -> list[Any]:
    codecs: list[Any] = []
    if compress:
        codecs.append(BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=np.dtype(dtype).itemsize))
    codecs.append(Crc32cCodec())
    return codecs


def get_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array `name` of `group` (zarr types a member as an array or a group; the names given here are arrays)."""
    return cast(zarr.Array, group[name])


def read_array(group: zarr.Group, name: str, selection: Any = slice(None)) -> np.ndarray:
    """`group[name][selection]`, a numpy array (zarr types a read as any array-like or a scalar; the selections
    given here are slices). CorruptError naming the chunk file when a chunk it reads is damaged."""
    arr = get_array(group, name)
    try:
        return cast(np.ndarray, arr[selection])
    except Exception as e:  # zarr raises ValueError for a checksum mismatch, others for undecodable bytes
        raise damaged_chunk(arr, _first_rows(selection, arr.shape[0]), e) from e


def read_rows(group: zarr.Group, name: str, rows: np.ndarray) -> np.ndarray:
    """The given rows (first axis; sorted, unique) of `group[name]`, in one read: zarr fetches and decodes the
    chunks they touch side by side, each once. CorruptError naming the chunk file when one is damaged."""
    arr = get_array(group, name)
    try:
        return cast(np.ndarray, arr.get_orthogonal_selection((rows,)))
    except Exception as e:  # as in read_array
        raise damaged_chunk(arr, (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0), e) from e


def _first_rows(selection: Any, n_rows: int) -> tuple[int, int]:
    """The rows [start, stop) of the first axis that a selection (an int, a slice, or a tuple starting with one)
    touches; all rows for anything else."""
    first = selection[0] if isinstance(selection, tuple) and selection else selection
    if isinstance(first, int | np.integer):
        return int(first), int(first) + 1
    if isinstance(first, slice):
        start, stop, _ = first.indices(n_rows)
        return start, max(start, stop)
    return 0, n_rows


def damaged_chunk(arr: zarr.Array, rows: tuple[int, int], cause: BaseException) -> CorruptError:
    """The error of a read of rows [start, stop) of `arr` that failed: it names the first chunk file there that
    cannot be read (each is read again on its own to find it), or the array when none fails alone."""
    root = Path(str(getattr(arr.store, "root", "")))
    grid = arr.shards or arr.chunks
    for key, sel in _chunk_keys(arr, arr.shape[0]):
        if not rows[0] // grid[0] <= sel[0].start // grid[0] <= (rows[1] - 1) // grid[0]:
            continue
        try:
            arr[sel]
        except Exception as e:  # the damaged one
            return CorruptError(f"chunk {root / key} is corrupted ({library_cause(e)}); re-create the store")
    return CorruptError(f"a chunk of {root / arr.path} is unreadable ({library_cause(cause)}); re-create the store")


def writable(arr: zarr.Array) -> zarr.Array:
    """`arr` set to store every chunk it is given. By default zarr skips (and deletes) a chunk equal to the fill
    value, 0 here: a chunk of zeros, such as `sequence` of a first window longer than a chunk, or `layer` of a
    store of block 0 alone, would then look missing to `verify`."""
    return arr.with_config({"write_empty_chunks": True})


def create_array(
    group: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: Any,
    dims: tuple[str, ...],
    compress: bool,
    inner: tuple[int, ...] | None = None,
) -> zarr.Array:
    """An array of the store conventions: fill 0, named dims, crc32c on every chunk (zstd first if `compress`).

    With `inner`, each chunk of shape `chunks` is one file holding inner chunks of shape `inner` (zarr's sharding
    codec, each inner chunk compressed and checksummed on its own), so that a read of a few rows decodes only
    the inner chunks that hold them; writers still write whole chunks.
    """
    return group.create_array(
        name,
        shape=shape,
        chunks=inner or chunks,
        shards=chunks if inner else None,
        dtype=dtype,
        fill_value=0,
        dimension_names=dims,
        compressors=_compressors(np.dtype(dtype), compress),
    )


def write_rows_at(group: zarr.Group, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Write each array's rows at [start, start + n) along its first axis, growing the array first if needed."""
    for name, values in arrays.items():
        arr = writable(get_array(group, name))
        stop = start + values.shape[0]
        if arr.shape[0] < stop:
            arr.resize((stop, *arr.shape[1:]))
        arr[start:stop] = values


R = TypeVar("R")


class ChunkCommitter(ABC, Generic[R]):
    """The commit protocol of every store written chunk by chunk (caches, shards of a cache, latents).

    A commit writes the chunk's data (`_write_data`: arrays first, then whatever the store derives from them, such
    as a cache's partial sums), and only then the record that makes the rows visible (`_record`: the root
    attribute's `n_tokens`, or a shard's progress), in one atomic file write. A kill at any moment leaves data
    that no reader uses beyond the last record; the next writer starts at the first chunk that is not full and
    rewrites it whole, so a resumed store equals an uninterrupted one.

    What a store derives from a chunk is computed by `derive`, apart from the writes, so that a caller that
    commits on a background thread can compute it on its own thread first and hand it to `commit`.
    """

    def derive(self, rows: R) -> Any:
        """What the store computes from a chunk's rows and writes with them (nothing, unless a subclass says)."""
        return None

    def commit(self, start: int, rows: R, derived: Any = None) -> None:
        """Commit the rows `rows` that start at token `start`, a chunk boundary; `derived`: `derive(rows)`, if
        the caller has computed it already."""
        if derived is None:
            derived = self.derive(rows)
        self._write_data(start, rows, derived)
        self._record(start, rows, derived)

    @abstractmethod
    def _write_data(self, start: int, rows: R, derived: Any) -> None:
        """Write the chunk's arrays, then what was derived from them."""

    @abstractmethod
    def _record(self, start: int, rows: R, derived: Any) -> None:
        """Make the chunk visible: the single atomic write that ends the commit."""


class StoreTransaction:
    """Exclusive write access to the store directory `out` for a run that creates, resumes or extends it.

    Entering makes `out` if needed, takes its writer lock (LockedError if another process writes) and removes the
    `.partial` files of a killed writer. `create(make)` empties `out` and makes a new empty store with `make(out)`;
    an MlsaeError inside the block then removes what this transaction made (and `out` itself if it did not exist
    before), so a refused or failed run leaves nothing half-written. A run that continues an existing store keeps
    its committed rows whatever happens (resuming is the point). Ctrl-C keeps everything committed. A full disk
    keeps it too, and leaves as OSError(ENOSPC) naming `out` (core.cli shows it as one line): the same command
    resumes once space is freed.
    """

    def __init__(self, out: Path | str, keep_on_interrupt: bool = True) -> None:
        """`keep_on_interrupt` False: Ctrl-C or a full disk also removes a store this transaction created (for
        writers that cannot resume, such as `import`)."""
        self.out = Path(out)
        self.keep_on_interrupt = keep_on_interrupt
        self.created = False
        self._existed = self.out.exists()
        self._lock = StoreLock(self.out, wait=PROBE_WAIT_S)

    def __enter__(self) -> StoreTransaction:
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except MlsaeError:
            self._remove_out_if_made()
            raise
        remove_partials(self.out)
        return self

    def create(self, make: Callable[[Path], None]) -> None:
        """Replace whatever `out` holds by the empty store that `make(out)` writes."""
        clear_store(self.out)
        self.created = True
        make(self.out)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        full = full_disk_error(exc, self.out) if isinstance(exc, Exception) else None
        try:
            stopped = isinstance(exc, KeyboardInterrupt) or full is not None
            failed = isinstance(exc, MlsaeError) or (stopped and not self.keep_on_interrupt)
            if failed and self.created:
                clear_store(self.out)
                self._remove_out_if_made()
        finally:
            self._lock.release()
        if full is not None:
            raise full from exc

    def _remove_out_if_made(self) -> None:
        if not self._existed and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()


def interrupted(out: Path, committed: int, unit: str) -> Interrupted:
    """What Ctrl-C during a chunked write leaves: the committed rows, which the same command resumes from."""
    if committed == 0:
        return Interrupted(f"interrupted before any {unit} were committed to {out}")
    return Interrupted(f"interrupted: {committed:,} {unit} are committed in {out}; re-run the same command to resume")


def _chunk_keys(arr: zarr.Array, n_rows: int) -> Iterator[tuple[str, tuple[slice, ...]]]:
    """(store key, selection) of every chunk (every file: a shard where the array is sharded) holding the first
    `n_rows` rows of `arr`."""
    extent, grid = (n_rows, *arr.shape[1:]), arr.shards or arr.chunks
    for coords in np.ndindex(*(math.ceil(s / c) for s, c in zip(extent, grid, strict=False))):
        sel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, grid, strict=False))
        yield f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}", sel


def open_checked(path: Path | str, arrays: tuple[str, ...], kind: str) -> zarr.Group:
    """The group at `path` (its root attribute already read), opened for reading once each of the format's
    `arrays` is there with readable metadata; CorruptError names the first that is not."""
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    for name in arrays:
        try:
            get_array(group, name)
        except Exception as e:  # zarr raises KeyError for a missing array, others for unreadable metadata
            raise CorruptError(
                f"{Path(path) / name / 'zarr.json'} is missing or unreadable ({library_cause(e)}): the {kind} at "
                f"{path} is damaged (re-create it)"
            ) from e
    return group


def array_layouts(make: Callable[[Any], None]) -> dict[str, dict[str, Any]]:
    """The metadata of each array that `make(store)` creates in an empty in-memory store: what a format's writer
    writes for a record (owners cache it per record; see `check_layout`)."""
    from zarr.storage import MemoryStore

    store = MemoryStore()
    make(store)
    group = zarr.open_group(store, mode="r", zarr_format=3)
    return {name: arr.metadata.to_dict() for name, arr in group.arrays()}


def check_layout(
    group: zarr.Group, path: Path | str, layouts: dict[str, dict[str, Any]], rows: dict[str, int], kind: str
) -> None:
    """CorruptError naming the zarr.json of the first array of `group` whose metadata is not what the format writes
    for the store's record (`layouts`, from array_layouts): the same dtype, chunking, codecs, fill value and dims;
    the same shape, but for arrays that grow along their first dim (0 rows in `layouts`), which must hold at least
    `rows[dim]` rows. Zarr rewrites these files on every commit, so they carry no checksum: this finds a changed
    value in one that still parses."""
    for name, expected in layouts.items():
        actual = dict(get_array(group, name).metadata.to_dict())
        shape, want = tuple(cast(list[int], actual.pop("shape"))), tuple(expected["shape"])
        wrong = sorted(k for k in {*actual, *expected} - {"shape"} if actual.get(k) != expected.get(k))
        dims = expected.get("dimension_names") or ("",)
        grows = bool(want) and want[0] == 0
        if not wrong and (shape == want if not grows else shape[1:] == want[1:] and shape[0] >= rows.get(dims[0], 0)):
            continue
        what = (
            f"its {wrong[0]} is {actual.get(wrong[0])!r}, not {expected.get(wrong[0])!r}" if wrong else f"shape {shape}"
        )
        raise CorruptError(
            f"{Path(path) / name / 'zarr.json'} does not describe the array this {kind}'s record implies ({what}): "
            f"the {kind} is damaged (re-create it)"
        )


def verify_group(
    path: Path | str,
    n_tokens: int,
    chunk_tokens: int,
    progress: Callable[[int], None] = lambda n: None,
    arrays: tuple[str, ...] = (),
    kind: str = "store",
) -> int:
    """Read and checksum every chunk holding committed data of the store at `path`: arrays along `token` up to
    n_tokens rows, along `token_chunk` up to the chunks those rows fill, others whole. `arrays` (the format's)
    must all be there.

    CorruptError names the first missing or corrupted chunk; returns the number of chunks checked.
    """
    names = sorted({*arrays, *(child.name for child in Path(path).iterdir() if (child / "zarr.json").is_file())})
    group = open_checked(path, tuple(names), kind)
    checked = 0
    for name in names:
        arr = get_array(group, name)
        assert isinstance(arr.metadata, ArrayV3Metadata)  # opened as zarr_format=3
        dims = arr.metadata.dimension_names or ()
        rows_by_dim: dict[str | None, int] = {"token": n_tokens, "token_chunk": math.ceil(n_tokens / chunk_tokens)}
        n_rows = rows_by_dim.get((dims or ("",))[0], arr.shape[0])
        for key, sel in _chunk_keys(arr, n_rows):
            if not asyncio.run(group.store.exists(key)):
                raise CorruptError(f"chunk {Path(path) / key} is missing (re-create the store, or resume its writer)")
            try:
                arr[sel]
            except Exception as e:  # zarr raises ValueError for a checksum mismatch, others for bad bytes
                raise CorruptError(f"chunk {Path(path) / key} is corrupted ({library_cause(e)}); re-create it") from e
            checked += 1
            progress(1)
    return checked
