"""Readers beside writers, with real processes: while a harvest extends a cache, a reader sees exactly the rows
committed when it opened the cache (never a chunk half-written), `fit` and `encode` (which need a finished cache)
refuse in one line and work once the harvest ends, `eval` gives the numbers of those rows, and the explorer says
its index is out of date; two fits and an encode reading one cache at once give what each gives alone.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient

from mlsae_analyze.cli import main as analyze_main
from mlsae_analyze.encode import EncodeConfig, run_encode
from mlsae_analyze.explorer.build import IndexConfig, run_index
from mlsae_analyze.explorer.serve import ExploreConfig, create_app
from mlsae_analyze.variance import VarianceConfig, run_variance
from mlsae_cache.core.lock import StoreLock
from mlsae_cache.core.zarrstore import StoreTransaction, being_written
from mlsae_cache.harvest import run_harvest
from mlsae_cache.store import Cache, open_cache, read_meta
from mlsae_train.cli import main as train_main
from mlsae_train.config import TrainConfig
from mlsae_train.evaluate import EvalConfig, run_eval
from mlsae_train.trainer import fit
from tests.cache.conftest import small_config
from tests.cache.test_resume import assert_same_store
from tests.train.test_trainer import assert_same_weights

FIRST, TOTAL = 1000, 6000
"""Tokens of the cache before the harvest that extends it, and after (1000: the last chunk is partial, so the
harvest rewrites a chunk holding committed rows)."""

SAE_OPTS = {"expansion_factor": 4, "k": 4, "batch_rows": 128, "block_units": 4, "device": "cpu"}


def cli(package: str, *args: object) -> list[str]:
    return [sys.executable, "-m", package, "--quiet", *map(str, args)]


def digest(cache: Cache, n: int) -> str:
    """A hash of rows [0, n) of `cache`, read both ways a reader reads them: the activations through zarr, every
    stored chunk through its file (rawchunks.py), and the token arrays."""
    h = hashlib.sha256(cache.activations(0, n).tobytes())
    for chunk in range(-(-n // cache.chunk_tokens)):
        stop = min(cache.chunk_tokens, n - chunk * cache.chunk_tokens)
        for layer in range(len(cache.layers)):
            h.update(cache.stored_chunk(chunk, layer)[:stop].tobytes())
    for array in cache.tokens(0, n):
        h.update(array.tobytes())
    return h.hexdigest()


def run(main: click.Group, *args: object) -> Result:
    return CliRunner().invoke(main, ["--quiet", *map(str, args)])


def build_explorer(root: Path, cache: Path, sae: Path) -> TestClient:
    run_encode(EncodeConfig(sae, cache, root / "latents", device="cpu"))
    run_variance(VarianceConfig(root / "latents", root / "variance", scheduler="sync"))
    run_index(IndexConfig(root / "latents", root / "index", root / "variance", sae, logits=False))
    return TestClient(create_app(ExploreConfig(root / "index")))


def test_readers_beside_a_harvest_that_extends_the_cache(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    out, sae = tmp_path / "cache", tmp_path / "sae"
    config = small_config(out, tiny_models["llama"], max_tokens=FIRST, dtype="float32")
    run_harvest(config)
    fit(TrainConfig(cache=out, out=sae, max_rows=FIRST, **SAE_OPTS))
    explorer = build_explorer(tmp_path, out, sae)
    assert explorer.get("/api/v1/latent/0").status_code == 200
    model = ["--model", tiny_models["llama"], "--device", "cpu", "--dtype", "float32"]
    grid = ["--context-length", 32, "--batch-size", 4, "--chunk-tokens", 128, "--max-tokens", TOTAL]
    harvest = subprocess.Popen(cli("mlsae_cache", "harvest", out, *model, *grid), stderr=subprocess.PIPE)
    try:
        seen, paused_at, paused = read_while_harvesting(harvest, tmp_path, out, sae, explorer)
        assert harvest.wait(timeout=120) == 0, harvest.stderr.read().decode() if harvest.stderr else ""
    finally:
        if harvest.poll() is None:
            harvest.kill()
            harvest.wait()
    assert paused_at is not None and FIRST < paused_at < TOTAL, "the harvest ended before it could be paused"

    final = open_cache(out)  # finished: what fit and encode refused is accepted now
    assert final.n_tokens == TOTAL and final.meta.complete
    expected = {n: digest(final, n) for n in {n for n, _ in seen}}
    for n, read in seen:
        assert read == expected[n], f"a reader of {n} committed rows read other values"
    assert len(expected) >= 3
    assert paused["eval"]["stop"] == paused_at  # eval read the rows committed when it opened the cache
    again = run_eval(EvalConfig(sae, out, stop=paused_at, device="cpu"))
    assert paused["eval"]["fvu"] == again.fvu and paused["eval"]["mse"] == again.mse
    assert explorer.get("/api/v1/latent/0").status_code == 409  # the index describes the first rows only


def read_while_harvesting(
    harvest: subprocess.Popen, root: Path, out: Path, sae: Path, explorer: TestClient
) -> tuple[list[tuple[int, str]], int | None, dict]:
    """Open and read the cache again and again until the harvest ends, pausing it once (SIGSTOP) after it has
    committed rows past FIRST to run the other readers: (rows committed when each read opened the cache, what it
    read of them), the rows committed when paused, what the readers gave then."""
    seen: list[tuple[int, str]] = []
    paused_at, paused = None, {}
    deadline = time.monotonic() + 120
    while harvest.poll() is None and time.monotonic() < deadline:
        cache = Cache(out)
        seen.append((cache.n_tokens, digest(cache, cache.n_tokens)))
        time.sleep(0.02)  # leave the harvest some CPU
        if paused_at is None and cache.n_tokens > FIRST:
            harvest.send_signal(signal.SIGSTOP)  # mid-harvest: more rows committed, the next chunk on its way
            try:
                wait_stopped(harvest.pid)
                paused_at = read_meta(out).n_tokens
                paused = readers_while_paused(root, out, sae, explorer)
            finally:
                harvest.send_signal(signal.SIGCONT)
    return seen, paused_at, paused


def wait_stopped(pid: int) -> None:
    """Wait until every thread of process `pid` has stopped (a signal is delivered, not obeyed, when sent)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in tasks]
        if all(state in "tT" for state in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


def readers_while_paused(root: Path, cache: Path, sae: Path, explorer: TestClient) -> dict:
    """Run the readers' commands against the cache of a paused harvest; what eval wrote."""
    sae_opts = [f"--{k.replace('_', '-')}={v}" for k, v in SAE_OPTS.items()]
    refused = [
        run(train_main, "fit", cache, root / "sae2", *sae_opts),
        run(analyze_main, "encode", sae, cache, root / "latents2", "--device", "cpu"),
    ]
    for result in refused:
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
        assert f"Error: {cache} is being written now" in result.stderr and "wait for it to finish" in result.stderr
    assert not (root / "sae2").exists() and not (root / "latents2").exists()
    evaluated = run(train_main, "eval", sae, cache, "--out", root / "eval.json", "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    stale = explorer.get("/api/v1/latent/0")
    assert stale.status_code == 409 and "out of date" in stale.json()["detail"]
    return {"eval": json.loads((root / "eval.json").read_text())}


def test_two_fits_and_an_encode_read_one_cache_at_once(tmp_path: Path, random_cache: Path) -> None:
    opts = {**SAE_OPTS, "max_rows": 2000, "checkpoint_every_rows": 1000}
    fit(TrainConfig(cache=random_cache, out=tmp_path / "alone", **opts))
    run_encode(EncodeConfig(tmp_path / "alone", random_cache, tmp_path / "latents-alone", device="cpu"))
    fit_args = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    procs = [
        subprocess.Popen(cli("mlsae_train", "fit", random_cache, tmp_path / "a", *fit_args), stderr=subprocess.PIPE),
        subprocess.Popen(cli("mlsae_train", "fit", random_cache, tmp_path / "b", *fit_args), stderr=subprocess.PIPE),
        subprocess.Popen(
            cli("mlsae_analyze", "encode", tmp_path / "alone", random_cache, tmp_path / "latents", "--device", "cpu"),
            stderr=subprocess.PIPE,
        ),
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert_same_weights(tmp_path / "a", tmp_path / "alone")
    assert_same_weights(tmp_path / "b", tmp_path / "alone")
    assert_same_store(tmp_path / "latents", tmp_path / "latents-alone")


def test_a_writer_waits_out_a_readers_probe(tmp_path: Path) -> None:
    """A reader refused an unfinished store first asks whether a writer holds its lock, by taking the lock for an
    instant (zarrstore.being_written); a harvest or an encode starting at that instant waits instead of refusing."""
    store = tmp_path / "store"
    store.mkdir()
    probe = StoreLock(store).acquire()
    threading.Timer(0.2, probe.release).start()
    with StoreTransaction(store):
        assert being_written(store)  # and a reader's probe sees the writer
