"""Sharded harvest: N workers writing disjoint chunks of one store give the single-process cache bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import zarr

from mlsae_cache.core.errors import InputError, LockedError, StoreError
from mlsae_cache.core.lock import StoreLock
from mlsae_cache.harvest import run_harvest
from mlsae_cache.store import Cache
from mlsae_cache.workers import ATTR, GROUP, WorkerPlan, read_plan, shard_dir
from tests.cache.conftest import small_config
from tests.cache.test_resume import _cli, assert_same_store, store_files
from tests.helpers import tokenizer_corpus


def run_shard(out: Path, model: Path, loaded, index: int, num_shards: int = 2, **overrides: object):  # noqa: ANN001, ANN201
    cfg = small_config(out, model, num_shards=num_shards, shard_index=index, **overrides)
    return run_harvest(cfg, loaded=loaded)


@pytest.fixture
def reference(tmp_path: Path, tiny_models: dict[str, Path], loaded_llama) -> Path:  # noqa: ANN001
    ref = tmp_path / "ref"
    run_harvest(small_config(ref, tiny_models["llama"]), loaded=loaded_llama)
    return ref


def test_two_shards_equal_one_process(tmp_path: Path, tiny_models: dict[str, Path], loaded_llama, reference) -> None:  # noqa: ANN001
    out, model = tmp_path / "sharded", tiny_models["llama"]
    first = run_shard(out, model, loaded_llama, 1)  # shards may run in any order
    assert not first.complete and "waiting for shards [0]" in first.message
    assert Cache(out).n_tokens == 0  # nothing is readable before the cache is complete
    last = run_shard(out, model, loaded_llama, 0)
    assert last.complete and last.n_tokens == 1000 and "from 2 shards" in last.message
    assert not (out / GROUP).exists()
    assert_same_store(out, reference)
    again = run_shard(out, model, loaded_llama, 1)
    assert again.noop and store_files(out) == store_files(reference)


def test_concurrent_shard_processes_equal_one_process(tmp_path: Path, tiny_models: dict[str, Path], reference) -> None:  # noqa: ANN001
    """Three real worker processes started together: one creates the store and plan, the others wait for it."""
    out = tmp_path / "sharded"
    base = [*_cli(out, tiny_models["llama"], 1000), "--num-shards", "3"]
    procs = [
        subprocess.Popen([*base, "--shard-index", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert sum("from 3 shards" in o for o, _ in outputs) == 1, outputs
    assert_same_store(out, reference)


def test_a_plan_still_being_written_reads_as_none(tmp_path: Path) -> None:
    """A worker looks for a plan without the store's lock; between another worker creating the shards' group and
    recording the plan there (its last write), it must see no plan rather than fail."""
    root = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    shards = root.create_group(GROUP)
    assert read_plan(tmp_path) is None
    plan = WorkerPlan(num_shards=2, max_tokens=100, first_chunk=0, chunk_tokens=16)
    shards.attrs[ATTR] = plan.to_dict()
    assert read_plan(tmp_path) == plan


def test_text_running_out_inside_a_shard(tmp_path: Path, tiny_models: dict[str, Path], loaded_llama) -> None:  # noqa: ANN001
    """The text ends in shard 1 of 3: shard 2 writes nothing, and the cache equals one process's, `exhausted`."""
    text = tmp_path / "short.txt"
    text.write_text("\n\n".join(tokenizer_corpus()[:6]))
    model, opts = tiny_models["llama"], {"dataset": str(text), "max_tokens": 3000}
    ref = tmp_path / "ref"
    run_harvest(small_config(ref, model, **opts), loaded=loaded_llama)
    n = Cache(ref).n_tokens
    assert Cache(ref).meta.exhausted and 1000 < n < 2000, n  # the text must end inside shard 1
    out = tmp_path / "sharded"
    for i in (2, 0, 1):
        result = run_shard(out, model, loaded_llama, i, num_shards=3, **opts)
    assert result.complete and result.exhausted and result.n_tokens == n
    assert_same_store(out, ref)


def _committed(out: Path, index: int) -> int:
    try:
        return json.loads((shard_dir(out, index) / "zarr.json").read_text())["attributes"]["mlsae_shards"]["committed"]
    except (OSError, ValueError, KeyError):
        return -1


def test_killed_shard_resumes(tmp_path: Path, tiny_models: dict[str, Path], loaded_llama, reference) -> None:  # noqa: ANN001
    out, model = tmp_path / "sharded", tiny_models["llama"]
    cmd = [*_cli(out, model, 1000), "--num-shards", "2", "--shard-index", "0"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and _committed(out, 0) < 128 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the shard finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < _committed(out, 0) < 512
    run_shard(out, model, loaded_llama, 1)
    result = run_shard(out, model, loaded_llama, 0)
    assert result.complete
    assert_same_store(out, reference)


def test_plain_harvest_refuses_unfinished_shards_then_completes_finished_ones(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    loaded_llama,  # noqa: ANN001
    reference: Path,
) -> None:
    out, model = tmp_path / "sharded", tiny_models["llama"]
    run_shard(out, model, loaded_llama, 0)
    before = store_files(out)
    with pytest.raises(StoreError, match=r"shards \[1\] have not finished.*--shard-index"):
        run_harvest(small_config(out, model), loaded=loaded_llama)
    assert store_files(out) == before
    with StoreLock(out, shared=True):  # stands for another worker still running: shard 1 cannot complete
        result = run_shard(out, model, loaded_llama, 1)
    assert not result.complete and "the last shard to finish completes" in result.message
    result = run_harvest(small_config(out, model), loaded=loaded_llama)
    assert result.complete and result.n_tokens == 1000
    assert_same_store(out, reference)


def test_sharded_extension_equals_a_fresh_longer_harvest(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    loaded_llama,  # noqa: ANN001
) -> None:
    grown, fresh, model = tmp_path / "grown", tmp_path / "fresh", tiny_models["llama"]
    run_harvest(small_config(grown, model, max_tokens=700), loaded=loaded_llama)
    for i in (0, 1):
        run_shard(grown, model, loaded_llama, i, max_tokens=1500)
    run_harvest(small_config(fresh, model, max_tokens=1500), loaded=loaded_llama)
    assert_same_store(grown, fresh)


def test_refusals(tmp_path: Path, tiny_models: dict[str, Path], loaded_llama) -> None:  # noqa: ANN001
    out, model = tmp_path / "sharded", tiny_models["llama"]
    with pytest.raises(InputError, match="needs --max-tokens"):
        small_config(out, model, num_shards=2, max_tokens=None)
    with pytest.raises(InputError, match=r"--shard-index 2 must be in 0..1"):
        small_config(out, model, num_shards=2, shard_index=2)
    with pytest.raises(InputError, match="--overwrite cannot be combined"):
        small_config(out, model, num_shards=2, overwrite=True)
    with pytest.raises(InputError, match="at most that many shards"):
        run_shard(out, model, loaded_llama, 0, num_shards=9)  # 8 chunks of 128 tokens
    assert not out.exists()
    run_shard(out, model, loaded_llama, 0, max_tokens=1000)
    before = store_files(out)
    with StoreLock(out, shared=True), pytest.raises(LockedError):  # a running shard
        run_harvest(small_config(out, model), loaded=loaded_llama)
    with pytest.raises(StoreError, match="--num-shards 2 --max-tokens 1000"):
        run_shard(out, model, loaded_llama, 0, num_shards=3)
    with StoreLock(shard_dir(out, 1)), pytest.raises(LockedError):  # the same shard running elsewhere
        run_shard(out, model, loaded_llama, 1)
    assert store_files(out) == before


def test_cli_reports_shards_and_refuses_bad_options(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    loaded_llama,  # noqa: ANN001
) -> None:
    out, model = tmp_path / "sharded", tiny_models["llama"]
    bad = subprocess.run(
        [*_cli(out, model, 1000), "--num-shards", "2", "--shard-index", "5"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--shard-index 5" in bad.stderr
    assert not out.exists()
    run_shard(out, model, loaded_llama, 1)
    info = subprocess.run([*_cli(out, model, 1000)[:3], "info", str(out), "--json"], capture_output=True, text=True)
    assert json.loads(info.stdout)["shards_done"] == "1 of 2 (waiting for [0])"
