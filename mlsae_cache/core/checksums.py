"""Checksums that let a reader refuse a damaged file instead of returning wrong numbers: the crc32c of a whole file
(weights files record theirs in their cfg.json), a record sealed with the crc32c of its own values, and the manifest
of a directory written whole (MANIFEST: the size and crc32c of each of its files), which the owners of such outputs
(the variance output, the explorer index) write last.

The crc32c is the one Zarr puts on every chunk, from the `crc32c` package (which releases the GIL; see
rawchunks.py). Files and records written before these existed carry none: readers accept them as they are, and
`verify` says that their bytes could not be checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import crc32c

from mlsae_cache.core.errors import CorruptError, StoreError
from mlsae_cache.core.verifying import Verified

MANIFEST = ".mlsae-checksums.json"
"""The manifest file of a directory written whole."""
MANIFEST_FORMAT = "mlsae-checksums"
SEAL = "crc32c"
"""The key of a sealed record that holds the crc32c of its other (sealed) keys."""
_BLOCK = 1 << 22


def file_crc32c(path: Path | str) -> str:
    """The crc32c of a file's bytes, as 8 hex digits."""
    value = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            value = crc32c.crc32c(block, value)
    return f"{value:08x}"


def check_file(path: Path | str, recorded: str, where: str, remake: str) -> None:
    """CorruptError naming `path` when its crc32c is not `recorded` (which `where` holds)."""
    path = Path(path)
    try:
        actual = file_crc32c(path)
    except OSError as e:
        raise CorruptError(f"{path} is unreadable ({e}); {remake}") from e
    if actual != recorded:
        raise CorruptError(
            f"{path} is corrupted: its crc32c is {actual}, {where} records {recorded} (a changed or lost byte; "
            f"{remake})"
        )


def _record_crc(record: dict[str, Any], keys: Iterable[str] | None) -> str:
    chosen = {k: v for k, v in record.items() if k != SEAL and (keys is None or k in keys)}
    text = json.dumps(chosen, sort_keys=True, separators=(",", ":"))
    return f"{crc32c.crc32c(text.encode()):08x}"


def seal(record: dict[str, Any], keys: Iterable[str] | None = None) -> dict[str, Any]:
    """`record` with SEAL set to the crc32c of its values (of `keys` only, where given: the ones that decide the
    numbers a reader returns, so that other keys may be edited or dropped, as `push` does with local paths)."""
    return {**record, SEAL: _record_crc(record, None if keys is None else tuple(keys))}


def check_seal(record: dict[str, Any], where: Path | str, remake: str, keys: Iterable[str] | None = None) -> bool:
    """Whether `record` (read from the file `where`) is sealed; CorruptError when its seal does not match."""
    if SEAL not in record:
        return False
    if record[SEAL] != _record_crc(record, None if keys is None else tuple(keys)):
        raise CorruptError(
            f"{where} is corrupted: its values do not match the crc32c recorded with them (a changed byte; {remake})"
        )
    return True


def check_weights_record(
    record: dict[str, Any], where: Path, weights: Path, crc_key: str, sealed: Iterable[str], remake: str, older: str
) -> list[str]:
    """Check a weights file's cfg.json: `record` (read from `where`) against its seal over the `sealed` keys, and the
    file `weights` against the crc32c the record keeps under `crc_key`; CorruptError naming the file that does not
    match. Returns notes on what carries no checksum (`older`: what such a record is, e.g. "an older lens")."""
    notes = []
    if not check_seal(record, where, remake, sealed):
        notes.append(f"{where} carries no crc32c ({older}): its values were checked for consistency only")
    if isinstance(record.get(crc_key), str):
        check_file(weights, record[crc_key], str(where), remake)
    else:
        notes.append(
            f"{where} records no crc32c of {weights.name} ({older}): its tensors were read and their shapes "
            "checked, their values could not be"
        )
    return notes


def write_manifest(directory: Path) -> None:
    """Record the size and crc32c of every file under `directory` in its MANIFEST (call it last: a file written
    afterwards would not match)."""
    files = {
        str(p.relative_to(directory)): [p.stat().st_size, file_crc32c(p)]
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    record = seal({"format": MANIFEST_FORMAT, "version": 1, "files": files})
    (Path(directory) / MANIFEST).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def read_manifest(directory: Path, remake: str) -> dict[str, Any] | None:
    """{relative path: [size, crc32c]} of the MANIFEST of `directory`; None when it has none (written before
    manifests were); CorruptError naming the manifest when it is unreadable or does not match its seal."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptError(f"{path} is unreadable ({e}; {remake})") from e
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("files"), dict)
        or not check_seal(record, path, remake)
    ):
        raise CorruptError(f"{path} is damaged (no sealed list of files; {remake})")
    return record["files"]  # type: ignore[no-any-return]


def check_manifest(directory: Path, files: dict[str, Any], remake: str, only: Iterable[str] | None = None) -> int:
    """Check the files of `directory` against `files` (read_manifest), those whose paths end with one of `only`
    where given: each is there with its size and crc32c; CorruptError naming the first that is not. Returns the
    number of files checked."""
    suffixes = tuple(only) if only is not None else None
    checked = 0
    for name, entry in sorted(files.items()):
        if suffixes is not None and not name.endswith(suffixes):
            continue
        path = Path(directory) / name
        if not path.is_file():
            raise CorruptError(f"{path} is missing ({remake})")
        size, recorded = entry
        if path.stat().st_size != size:
            raise CorruptError(
                f"{path} is corrupted: {path.stat().st_size} bytes, {MANIFEST} records {size} ({remake})"
            )
        check_file(path, recorded, MANIFEST, remake)
        checked += 1
    return checked


def verify_output(path: Path) -> Verified:
    """Check an output directory of any other kind against its manifest (StoreError when it has none)."""
    files = read_manifest(path, "run the command that wrote it again")
    if files is None:
        from mlsae_cache.core.paths import what_is

        raise StoreError(f"{path} is {what_is(path)}, which carries no checksums to verify")
    return Verified("output", check_manifest(path, files, "run the command that wrote it again"), "files")
