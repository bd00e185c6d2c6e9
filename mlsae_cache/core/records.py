"""Versioned metadata and result records: one way to write, read and refuse every JSON the packages exchange.

A record is a frozen dataclass with class attributes FORMAT (e.g. "mlsae-eval"), VERSION, KIND (what a user calls
it) and REMAKE (the command that makes one). `to_dict` adds `format` and `version` to the fields; `from_dict` refuses
another format or a newer version with a one-line StoreError, and fills the dataclass from the keys it knows
(newer minor keys are ignored, a missing required key is named). A file without `format` is read as version 0: the
JSON outputs written before records carried a version (their fields are the same).

The same check serves the root attributes of the Zarr stores (`check_format`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any, ClassVar, Self

from mlsae_cache.core.errors import NotFoundError, StoreError
from mlsae_cache.core.paths import what_is

LEGACY_VERSION = 0
"""The version a JSON output without a `format` key is read as (written before outputs carried one)."""


def check_format(
    data: dict[str, Any], fmt: str, version: int, path: Path | str, kind: str, remake: str, legacy: bool = False
) -> int:
    """The version of `data` (a record or a store's root attribute) when this mlsae reads it: format `fmt` at a
    version up to `version` (a missing format is version 0 where `legacy`); StoreError otherwise."""
    if legacy and "format" not in data:
        return LEGACY_VERSION
    if data.get("format") != fmt:
        raise StoreError(f"{path} is not an mlsae {kind} (format {data.get('format')!r}; expected {fmt!r})")
    got = data.get("version")
    if isinstance(got, bool) or not isinstance(got, int) or not 0 <= got <= version:
        raise StoreError(
            f"{path} is an mlsae {kind} of format version {got!r}, but this mlsae reads versions up to "
            f"{version} (upgrade mlsae, or {remake})"
        )
    return got


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON beside `path`, then rename it into place (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json_object(path: Path, kind: str, hint: str) -> dict[str, Any]:
    """The JSON object in `path`; NotFoundError / StoreError naming `kind` and how to get a good one otherwise."""
    path = Path(path)
    if path.is_dir():
        raise NotFoundError(f"{kind} {path} is {what_is(path)}, not a file ({hint})")
    if not path.is_file():
        where = f": {path.parent} is {what_is(path.parent)}" if path.parent.is_dir() else ""
        raise NotFoundError(f"{kind} {path} does not exist{where} ({hint})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{kind} {path} is not valid JSON: {e} ({hint})") from e
    if not isinstance(data, dict):
        raise StoreError(f"{kind} {path} holds a {type(data).__name__}, not an object ({hint})")
    return data


def to_json(value: Any) -> Any:
    """A field's value as JSON: tuples become lists, NaN and infinities null (JSON has none)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


class Record:
    """Base of the versioned JSON records (frozen dataclasses); see the module docstring."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    KIND: ClassVar[str]
    REMAKE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"format": self.FORMAT, "version": self.VERSION, **fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | str = "") -> Self:
        check_format(data, cls.FORMAT, cls.VERSION, source, cls.KIND, cls.REMAKE, legacy=True)
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        missing = [
            f.name
            for f in fields
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise StoreError(f"{cls.KIND} {source} lacks {', '.join(missing)} ({cls.REMAKE})")
        try:
            return cls(**{f.name: data[f.name] for f in fields if f.name in data})
        except (TypeError, ValueError) as e:
            raise StoreError(f"{cls.KIND} {source} holds invalid values: {e} ({cls.REMAKE})") from e

    def write(self, path: Path | str) -> Path:
        """This record as JSON at `path`, written atomically; returns the path."""
        write_json_atomically(Path(path), self.to_dict())
        return Path(path)

    @classmethod
    def read(cls, path: Path | str) -> Self:
        """The record in the JSON file `path`; a one-line error for anything else."""
        return cls.from_dict(read_json_object(Path(path), cls.KIND, cls.REMAKE), path)
