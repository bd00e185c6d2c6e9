"""Kill-and-resume, no-op, refuse, extend and lock: the reliability contract of the cache (docs/FORMAT.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from mlsae_cache import rawchunks
from mlsae_cache.core.errors import LockedError, StoreError
from mlsae_cache.core.lock import StoreLock
from mlsae_cache.harvest import run_harvest
from mlsae_cache.models import LoadedModel
from mlsae_cache.store import Cache, read_meta
from tests.cache.conftest import small_config


class Crash(BaseException):
    """Stands for a kill: not an Exception, so nothing in the library handles it."""


def store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    fa, fb = store_files(a), store_files(b)
    assert sorted(fa) == sorted(fb)
    different = [k for k in fa if fa[k] != fb[k]]
    assert not different, f"files differ: {different[:5]}"


@pytest.fixture
def reference(tmp_path: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel) -> Path:
    out = tmp_path / "reference"
    run_harvest(small_config(out, tiny_models["llama"]), loaded=loaded_llama)
    return out


@pytest.mark.parametrize("crash_at", [1, 2, 5, 9, 14, 22, 40, 61, 73])  # 73: the last write of the run
def test_crash_at_any_write_then_resume_is_identical(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    loaded_llama: LoadedModel,
    reference: Path,
    monkeypatch: pytest.MonkeyPatch,
    crash_at: int,
) -> None:
    """Every array write (data, partial statistics, statistics) is a possible crash point."""
    out = tmp_path / "c"
    cfg = small_config(out, tiny_models["llama"])
    original = zarr.Array.__setitem__
    calls = {"n": 0}

    def crashing(self, key, value):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise Crash
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", crashing)
    with pytest.raises(Crash):
        run_harvest(cfg, loaded=loaded_llama)
    monkeypatch.setattr(zarr.Array, "__setitem__", original)
    assert not read_meta(out).complete
    run_harvest(cfg, loaded=loaded_llama)
    assert_same_store(out, reference)


@pytest.mark.parametrize("crash_at", [1, 3, 11])
def test_crash_inside_a_raw_chunk_write_then_resume_is_identical(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    loaded_llama: LoadedModel,
    reference: Path,
    monkeypatch: pytest.MonkeyPatch,
    crash_at: int,
) -> None:
    """Full activation chunks bypass zarr (rawchunks.py): a crash between writing a chunk's file and renaming it
    into place leaves a `.partial` file, which the resumed run removes."""
    out = tmp_path / "c"
    cfg = small_config(out, tiny_models["llama"])
    calls = {"n": 0}

    def crashing(src, dst):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise Crash
        return os.replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(rawchunks, "os", SimpleNamespace(replace=crashing))  # rawchunks.py's renames only
        with pytest.raises(Crash):
            run_harvest(cfg, loaded=loaded_llama)
    assert list(out.rglob("*.partial"))
    run_harvest(cfg, loaded=loaded_llama)
    assert_same_store(out, reference)


def test_crash_while_creating_the_store_then_rerun_is_identical(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    loaded_llama: LoadedModel,
    reference: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed before the group's zarr.json is renamed into place, OUT holds only a `.partial` file: the same
    command starts afresh instead of refusing a directory that is not a cache."""
    out = tmp_path / "c"

    def crashing(src, dst):  # noqa: ANN001, ANN202
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crashing)
        with pytest.raises(Crash):
            run_harvest(small_config(out, tiny_models["llama"]), loaded=loaded_llama)
    assert [p.name.endswith(".partial") for p in out.iterdir()] == [True]
    run_harvest(small_config(out, tiny_models["llama"]), loaded=loaded_llama)
    assert_same_store(out, reference)


def _cli(out: Path, model: Path, max_tokens: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlsae_cache",
        "--quiet",
        "harvest",
        str(out),
        "--model",
        str(model),
        "--context-length",
        "32",
        "--max-tokens",
        str(max_tokens),
        "--batch-size",
        "4",
        "--chunk-tokens",
        "128",
        "--device",
        "cpu",
    ]


def _n_tokens(out: Path) -> int:
    try:
        return json.loads((out / "zarr.json").read_text())["attributes"]["mlsae"]["n_tokens"]
    except (OSError, ValueError, KeyError):
        return -1


def test_sigkill_then_resume_is_identical(
    tmp_path: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel
) -> None:
    """A real subprocess killed with SIGKILL at several moments, then re-run, equals an uninterrupted harvest."""
    n = 6000
    ref = tmp_path / "ref"
    run_harvest(small_config(ref, tiny_models["llama"], max_tokens=n), loaded=loaded_llama)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills = 0
    for threshold in (0, 1000, 3000):
        proc = subprocess.Popen(_cli(out, tiny_models["llama"], n), env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _n_tokens(out) < threshold + 1 and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the harvest finished before it could be killed; make it longer"
    assert _n_tokens(out) < n
    subprocess.run(_cli(out, tiny_models["llama"], n), env=env, check=True, capture_output=True)
    assert_same_store(out, ref)


def test_complete_cache_is_a_noop(small_cache: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel) -> None:
    before = store_files(small_cache)
    result = run_harvest(small_config(small_cache, tiny_models["llama"], dtype="float32"), loaded=loaded_llama)
    assert result.noop and "nothing to do" in result.message
    assert store_files(small_cache) == before


def test_other_settings_are_refused(small_cache: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel) -> None:
    before = store_files(small_cache)
    with pytest.raises(StoreError, match=r"context_length: 32 vs 16.*--overwrite"):
        run_harvest(
            small_config(small_cache, tiny_models["llama"], dtype="float32", context_length=16), loaded=loaded_llama
        )
    assert store_files(small_cache) == before
    run_harvest(
        small_config(small_cache, tiny_models["llama"], dtype="float32", context_length=16, overwrite=True),
        loaded=loaded_llama,
    )
    assert Cache(small_cache).meta.context_length == 16


def test_extend_equals_a_fresh_longer_harvest(
    tmp_path: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel
) -> None:
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    run_harvest(small_config(grown, tiny_models["llama"], max_tokens=700), loaded=loaded_llama)
    assert Cache(grown).n_tokens == 700
    result = run_harvest(small_config(grown, tiny_models["llama"], max_tokens=1500), loaded=loaded_llama)
    assert not result.noop and Cache(grown).n_tokens == 1500
    run_harvest(small_config(fresh, tiny_models["llama"], max_tokens=1500), loaded=loaded_llama)
    assert_same_store(grown, fresh)


def test_smaller_max_tokens_is_a_noop(
    small_cache: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel
) -> None:
    result = run_harvest(
        small_config(small_cache, tiny_models["llama"], dtype="float32", max_tokens=10), loaded=loaded_llama
    )
    assert result.noop and Cache(small_cache).n_tokens == 1000


def test_second_writer_is_refused(small_cache: Path, tiny_models: dict[str, Path], loaded_llama: LoadedModel) -> None:
    with StoreLock(small_cache):
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from mlsae_cache.core.lock import StoreLock; import sys\nwith StoreLock({str(small_cache)!r}): pass",
            ],
            capture_output=True,
            text=True,
        )
        assert child.returncode != 0 and "LockedError" in child.stderr
        with pytest.raises(LockedError, match="another process"):
            run_harvest(
                small_config(small_cache, tiny_models["llama"], dtype="float32", max_tokens=2000), loaded=loaded_llama
            )
    run_harvest(small_config(small_cache, tiny_models["llama"], dtype="float32", max_tokens=2000), loaded=loaded_llama)
    assert Cache(small_cache).n_tokens == 2000


def test_a_dead_writer_does_not_hold_the_lock(small_cache: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom mlsae_cache.core.lock import StoreLock\n"
            f"with StoreLock({str(small_cache)!r}):\n    print('held', flush=True)\n"
            "    time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LockedError):
        StoreLock(small_cache).__enter__()
    proc.kill()
    proc.wait()
    with StoreLock(small_cache):
        pass


def test_shards_of_statistics_are_exact(small_cache: Path) -> None:
    """The per-chunk partial sums add up to the stored statistics (what a sharded harvest will merge)."""
    group = zarr.open_group(str(small_cache), mode="r")
    count = group["chunk_count"][:].sum()
    np.testing.assert_array_equal(group["chunk_sum"][:].sum(axis=0) / count, Cache(small_cache).layer_mean())
