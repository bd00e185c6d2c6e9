"""Bad-input cases run through a command line, and the stores they are made of.

A case is a command line (with `{name}` placeholders for the paths of `World`), the exit code it must end with and
a fragment of its one error line. `check` runs it through click's CliRunner and asserts what every command owes a
user who gave it something wrong: exactly one line of output, `Error: ...`, no traceback, the exit code (2 for
input, 1 for runtime), and nothing created or changed under the world's root (every file's size and mtime, the set
of directories)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from click.testing import CliRunner

from tests.explorer.stores import Stores, make_stores


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    message: str
    code: int = 2


def case(id: str, *args: str, message: str, code: int = 2) -> Case:
    return Case(id, args, message, code)


def tree(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file under `root` with its size and mtime, every directory with None."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def check(main: click.Group, c: Case, paths: dict[str, Path], root: Path) -> None:
    """Run case `c` of the command line `main` and assert the one-line error contract."""
    args = [str(paths[a[1:-1]]) if a.startswith("{") and a.endswith("}") else a for a in c.args]
    before = tree(root)
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        trace = "".join(traceback.format_exception(*result.exc_info))  # type: ignore[misc]
        raise AssertionError(f"{c.id}: uncaught {trace}")
    lines = result.output.splitlines()
    assert result.exit_code == c.code, f"{c.id}: exit {result.exit_code}: {result.output}"
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"{c.id}: {result.output}"
    assert result.stderr == result.output, f"{c.id}: the error goes to stderr: {result.output}"
    assert c.message in lines[0], f"{c.id}: {lines[0]!r} lacks {c.message!r}"
    assert tree(root) == before, f"{c.id}: files changed: {_changes(before, tree(root))}"


def _changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in {*before, *after} if before.get(k, "absent") != after.get(k, "absent"))[:10]


@dataclass(frozen=True)
class World:
    """Good stores of every kind (`stores`), broken copies of them and other bad paths (`paths`), all under
    `root`; an output path `out` that does not exist."""

    root: Path
    stores: Stores
    paths: dict[str, Path]


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set_root(path: Path, key: str, value: object) -> None:
    _edit_json(path / "zarr.json", lambda d: d["attributes"]["mlsae"].__setitem__(key, value))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def first_chunk(array: Path) -> Path:
    return next(p for p in sorted(array.rglob("*")) if p.is_file() and p.name != "zarr.json")


ROOT_BREAKS: dict[str, Callable[[Path], object]] = {
    "root-garbage": lambda p: (p / "zarr.json").write_text("{not json"),
    "root-truncated": lambda p: _truncate(p / "zarr.json"),
    "root-empty": lambda p: (p / "zarr.json").write_text(""),
    "future-version": lambda p: _set_root(p, "version", 99),
    "no-record": lambda p: _edit_json(p / "zarr.json", lambda d: d["attributes"].pop("mlsae")),
}
"""Ways to break the root metadata of any Zarr store, by name."""


def _store_breaks(kind: str, array: str) -> dict[str, Callable[[Path], object]]:
    """Breaks of a store of `kind` whose array `array` exists: root breaks, the array's metadata or a chunk."""
    breaks = {f"{kind}-{name}": fn for name, fn in ROOT_BREAKS.items()}
    breaks[f"{kind}-array-missing"] = lambda p: shutil.rmtree(p / array)
    breaks[f"{kind}-array-meta-garbage"] = lambda p: (p / array / "zarr.json").write_text("{not json")
    breaks[f"{kind}-chunk-flipped"] = lambda p: flip_byte(first_chunk(p / array))
    breaks[f"{kind}-chunk-truncated"] = lambda p: _truncate(first_chunk(p / array))
    return breaks


def _sae_breaks() -> dict[str, Callable[[Path], object]]:
    return {
        "sae-cfg-missing": lambda p: (p / "cfg.json").unlink(),
        "sae-cfg-garbage": lambda p: (p / "cfg.json").write_text("{not json"),
        "sae-cfg-not-object": lambda p: (p / "cfg.json").write_text("[1, 2]"),
        "sae-future-version": lambda p: _edit_json(p / "cfg.json", lambda d: d.__setitem__("version", 99)),
        "sae-cfg-no-k": lambda p: _edit_json(p / "cfg.json", lambda d: d.pop("k")),
        "sae-k-text": lambda p: _edit_json(p / "cfg.json", lambda d: d.__setitem__("k", "four")),
        "sae-d-model-wrong": lambda p: _edit_json(p / "cfg.json", lambda d: d.__setitem__("d_model", 33)),
        "sae-weights-missing": lambda p: (p / "sae.safetensors").unlink(),
        "sae-weights-truncated": lambda p: _truncate(p / "sae.safetensors"),
        "sae-weights-header-flipped": lambda p: flip_byte(p / "sae.safetensors", 0.001),
        "sae-weights-empty": lambda p: (p / "sae.safetensors").write_bytes(b""),
    }


def make_world(root: Path) -> World:
    """The stores of tests/explorer/stores.py plus broken copies of each and other bad paths, in `root`."""
    stores = make_stores(root / "stores")
    paths: dict[str, Path] = {
        "cache": stores.cache,
        "sae": stores.sae,
        "latents": stores.latents,
        "variance": stores.variance,
        "missing": root / "absent",
        "out": root / "out",
        "empty-dir": root / "empty-dir",
        "text-file": root / "notes.txt",
        "empty-file": root / "empty.npy",
    }
    paths["empty-dir"].mkdir()
    paths["text-file"].write_text("not a store\n")
    paths["empty-file"].write_bytes(b"")
    sources = {"cache": stores.cache, "latents": stores.latents, "variance": stores.variance / "variance.zarr"}
    breaks = {
        **{k: ("cache", f) for k, f in _store_breaks("cache", "activations").items()},
        **{k: ("latents", f) for k, f in _store_breaks("latents", "indices").items()},
        **{k: ("sae", f) for k, f in _sae_breaks().items()},
    }
    for name, (kind, fn) in breaks.items():
        copy = root / "broken" / name
        shutil.copytree(sources.get(kind, getattr(stores, kind)), copy)
        fn(copy)
        paths[name] = copy
    return World(root, stores, paths)


def npy_files(root: Path) -> dict[str, Path]:
    """Arrays for `mlsae-cache import`: good ones and bad ones, by name."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "acts": rng.normal(size=(100, 2, 8)).astype(np.float32),
        "acts-2d": rng.normal(size=(100, 8)).astype(np.float32),
        "acts-4d": rng.normal(size=(10, 10, 2, 8)).astype(np.float32),
        "acts-no-tokens": np.zeros((0, 2, 8), np.float32),
        "acts-int": rng.integers(0, 9, size=(100, 2, 8)),
        "acts-complex": np.zeros((100, 2, 8), np.complex64),
        "acts-nan": np.full((100, 2, 8), np.nan, np.float32),
        "acts-huge": np.full((100, 2, 8), 1e6, np.float32),
        "ids": rng.integers(0, 50, 100).astype(np.int32),
        "ids-short": rng.integers(0, 50, 99).astype(np.int32),
        "ids-float": rng.normal(size=100),
        "ids-negative": -np.ones(100, np.int64),
    }
    paths = {}
    for name, a in arrays.items():
        np.save(root / f"{name}.npy", a)
        paths[name] = root / f"{name}.npy"
    _truncate(Path(shutil.copy(paths["acts"], root / "acts-truncated.npy")))
    paths["acts-truncated"] = root / "acts-truncated.npy"
    (root / "acts-text.npy").write_text("not an array\n")
    paths["acts-text"] = root / "acts-text.npy"
    np.save(root / "acts-object.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    paths["acts-object"] = root / "acts-object.npy"
    return paths
