"""Training end to end: resume after a crash or a kill equals an uninterrupted run bit for bit; bad input;
recovery of a known dictionary through the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mlsae_cache.store import CacheWriter
from mlsae_train.checkpoint import load_sae
from mlsae_train.cli import main
from mlsae_train.config import TrainConfig
from mlsae_train.loss import mean_max_cosine
from mlsae_train.state import STATE_NAME
from mlsae_train.trainer import fit
from tests.cache.test_resume import store_files
from tests.train.conftest import import_npy

SMALL = {
    "expansion_factor": 4,
    "k": 4,
    "batch_rows": 128,
    "max_rows": 6000,
    "checkpoint_every_rows": 1000,
    "log_every_steps": 5,
    "block_units": 4,
    "device": "cpu",
    "dead_after_rows": 500,
}
CLI_SMALL = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]


class Crash(BaseException):
    pass


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "sae.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"] == sorted(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_fit_writes_the_checkpoint_format(tmp_path: Path, random_cache: Path) -> None:
    # 256 latents, one per row, 128 rows per step: at least half are idle every step, so AuxK must run.
    opts = {**SMALL, "expansion_factor": 16, "k": 1, "dead_after_rows": 128}
    result = fit(TrainConfig(cache=random_cache, out=tmp_path / "sae", **opts))
    assert result.rows >= 6000
    sae, cfg = load_sae(tmp_path / "sae")
    assert cfg["format"] == "mlsae-sae" and cfg["version"] == 1 and cfg["n_latents"] == 256 and cfg["k"] == 1
    assert cfg["layers"] == [0, 1, 2] and cfg["standardize"] is True and cfg["lr"] == 1e-4
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["rows"] == result.rows and set(lines[0]["fvu_per_layer"]) == {"0", "1", "2"}
    assert {"fvu", "l0", "dead_fraction", "auxk", "rows_per_s"} <= set(lines[0])
    assert all(line["auxk"] > 0 for line in lines[1:]) and lines[-1]["dead_fraction"] > 0


@pytest.mark.parametrize("crash_step", [3, 17, 40])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path: Path, random_cache: Path, crash_step: int) -> None:
    fit(TrainConfig(cache=random_cache, out=tmp_path / "ref", **SMALL))
    cfg = TrainConfig(cache=random_cache, out=tmp_path / "run", **SMALL)
    steps = {"n": 0}

    def crash(n: int, **facts: object) -> None:
        if "total" in facts:
            return
        steps["n"] += 1
        if steps["n"] == crash_step:
            raise Crash

    with pytest.raises(Crash):
        fit(cfg, progress=crash)
    fit(TrainConfig(cache=random_cache, out=tmp_path / "run", resume=True, **SMALL))
    assert_same_weights(tmp_path / "run", tmp_path / "ref")
    log_run = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    log_ref = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if k != "rows_per_s"} for line in log_run]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "rows_per_s"} for line in log_ref]


def test_resume_of_a_finished_run_changes_no_file(tmp_path: Path, random_cache: Path) -> None:
    """Re-running a finished fit with --resume (as `make demo` does) leaves the checkpoint's bytes, and so the
    fingerprint that encoded latents record, as they were."""
    fit(TrainConfig(cache=random_cache, out=tmp_path / "run", **SMALL))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    result = fit(TrainConfig(cache=random_cache, out=tmp_path / "run", resume=True, **SMALL))
    assert result.rows >= 6000 and not result.final
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    again = CliRunner().invoke(
        main, ["--quiet", "fit", str(random_cache), str(tmp_path / "run"), "--resume", *CLI_SMALL]
    )
    assert again.exit_code == 0 and again.output.strip().endswith("nothing to do"), again.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path: Path, random_cache: Path) -> None:
    opts = [
        "--expansion-factor",
        "4",
        "--k",
        "4",
        "--batch-rows",
        "128",
        "--max-rows",
        "30000",
        "--checkpoint-every-rows",
        "3000",
        "--device",
        "cpu",
        "--block-units",
        "4",
    ]
    ref, run = tmp_path / "ref", tmp_path / "run"
    cmd = [sys.executable, "-m", "mlsae_train", "--quiet", "fit", str(random_cache)]
    subprocess.run([*cmd, str(ref), *opts], check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, str(run), *opts], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / STATE_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "training finished before it could be killed"
    subprocess.run([*cmd, str(run), *opts, "--resume"], check=True, capture_output=True)
    assert_same_weights(run, ref)


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(main, ["--quiet", *args], catch_exceptions=False)


@pytest.fixture
def incomplete_cache(tmp_path: Path) -> Path:
    path = import_npy(tmp_path, np.ones((300, 2, 8), np.float32), "incomplete")
    CacheWriter(path).set_meta(complete=False)
    return path


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("k-zero", ["--k", "0"], "--k must be at least 1"),
        ("k-too-large", ["--k", "100", "--expansion-factor", "1"], "exceeds the SAE's 16 latents"),
        ("expansion-zero", ["--expansion-factor", "0"], "--expansion-factor must be at least 1"),
        ("layers-not-in-cache", ["--layers", "0,5"], "blocks [5] are not in the cache"),
        ("not-a-cache", ["CACHE=/"], "not an mlsae cache"),
        ("incomplete-cache", ["CACHE=incomplete"], "is incomplete"),
    ],
    ids=lambda v: v if isinstance(v, str) and not v.startswith("-") else None,
)
def test_fit_bad_input(
    tmp_path: Path, random_cache: Path, incomplete_cache: Path, case: str, args: list[str], message: str
) -> None:
    cache = str(random_cache)
    if args and args[0].startswith("CACHE="):
        cache = str(incomplete_cache) if args[0] == "CACHE=incomplete" else str(tmp_path)
        args = []
    out = tmp_path / "out"
    result = invoke("fit", cache, str(out), "--device", "cpu", "--max-rows", "256", "--batch-rows", "128", *args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not out.exists()


def test_out_holding_another_run_is_refused_untouched(tmp_path: Path, random_cache: Path) -> None:
    out = tmp_path / "sae"
    fit(TrainConfig(cache=random_cache, out=out, **SMALL))
    before = store_files(out)
    other = import_npy(tmp_path, np.random.default_rng(1).normal(size=(500, 3, 16)).astype(np.float32), "other")
    base = ["fit", str(random_cache), str(out), "--device", "cpu", "--expansion-factor", "4", "--k", "4"]
    cases = {
        "another-run": (base, "holds a run of other settings"),
        "resume-other-config": ([*base[:-1], "8", "--resume"], "--k 8 (the run has 4)"),
        "resume-other-cache": ([base[0], str(other), *base[2:], "--resume"], "cache_fingerprint"),
    }
    for args, message in cases.values():
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert store_files(out) == before


def test_recovers_a_known_dictionary(tmp_path: Path) -> None:
    """Sparse positive combinations of known unit atoms, layer scales 1 / 5 / 30: the decoder finds the atoms
    (mean-centred, as standardisation removes each row's mean)."""
    rng = np.random.default_rng(0)
    d, n_atoms, n_tokens, k_true = 32, 48, 8000, 3
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    scales = np.array([1.0, 5.0, 30.0])
    x = np.zeros((n_tokens, 3, d))
    for layer, scale in enumerate(scales):
        idx = np.argsort(rng.random((n_tokens, n_atoms)), axis=1)[:, :k_true]
        coef = rng.uniform(0.5, 2.0, size=(n_tokens, k_true))
        x[:, layer] = scale * np.einsum("tk,tkd->td", coef, atoms[idx])
    cache = import_npy(tmp_path, x.astype(np.float32), "dictionary", chunk_tokens=1024)
    out = tmp_path / "sae"
    result = invoke(
        "fit",
        str(cache),
        str(out),
        "--expansion-factor",
        "4",
        "--k",
        "3",
        "--lr",
        "3e-3",
        "--batch-rows",
        "512",
        "--max-rows",
        "400000",
        "--device",
        "cpu",
        "--dead-after-rows",
        "20000",
    )
    assert result.exit_code == 0, result.stderr
    sae, _ = load_sae(out)
    centred = torch.from_numpy(atoms - atoms.mean(axis=1, keepdims=True)).float()
    score = float(mean_max_cosine(centred, sae.W_dec.detach()))
    assert score >= 0.9, f"mean best cosine {score:.3f}"
    ev = invoke("eval", str(out), str(cache), "--out", str(tmp_path / "eval.json"), "--device", "cpu")
    assert ev.exit_code == 0, ev.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["layer"] == [0, 1, 2] and max(report["fvu"]) < 0.2 and report["l0"] == pytest.approx([3, 3, 3])
    assert set(report) >= {"layer", "fvu", "mse", "l0", "dead_fraction"}
    # raw-unit MSE follows the 30x layer scales (FVU does not)
    assert report["mse"][2] > 100 * report["mse"][0]


@pytest.mark.parametrize(
    ("args", "check"),
    [
        (["--no-standardize"], lambda cfg, lines: cfg["standardize"] is False),
        (["--autocast", "bf16"], lambda cfg, lines: cfg["autocast"] == "bf16" and lines[-1]["fvu"] < 1.5),
        (["--k-aux", "0", "--dead-after-rows", "1"], lambda cfg, lines: all(x["auxk"] == 0 for x in lines)),
        (["--log-every-steps", "3"], lambda cfg, lines: [x["step"] for x in lines][:3] == [1, 3, 6]),
        (["--train-tokens", "1000"], lambda cfg, lines: cfg["train_tokens"] == 1000),
    ],
    ids=["no-standardize", "autocast-bf16", "k-aux-0", "log-every", "train-tokens"],
)
def test_fit_options_take_effect(tmp_path: Path, random_cache: Path, args: list[str], check) -> None:  # noqa: ANN001
    out = tmp_path / "sae"
    result = invoke(
        "fit",
        str(random_cache),
        str(out),
        "--device",
        "cpu",
        "--expansion-factor",
        "2",
        "--k",
        "4",
        "--batch-rows",
        "128",
        "--max-rows",
        "2560",
        *args,
    )
    assert result.exit_code == 0, result.stderr
    cfg = json.loads((out / "cfg.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert check(cfg, lines)


def _fvu_numpy(x: np.ndarray, x_hat: np.ndarray, layer: np.ndarray, n_layers: int) -> np.ndarray:
    """FVU of each layer's rows against their per-dimension mean, in float64 (the slow reference)."""
    out = np.full(n_layers, np.nan)
    for b in range(n_layers):
        rows = layer == b
        if rows.any():
            err = ((x[rows] - x_hat[rows]) ** 2).sum()
            out[b] = err / ((x[rows] - x[rows].mean(0)) ** 2).sum()
    return out


@pytest.mark.parametrize("loss_space", ["standardized", "raw"])
def test_the_logged_fvu_is_in_raw_units_whatever_the_loss_space(loss_space: str) -> None:
    from mlsae_train.sae import SaeConfig, TopKSAE
    from mlsae_train.trainer import step_loss

    gen = torch.Generator().manual_seed(0)
    n_layers, d = 3, 16
    layer = torch.arange(96) % n_layers
    x = torch.randn(96, d, generator=gen) * (1 + 10 * layer[:, None].float()) + 3.0  # layers of different scales
    sae = TopKSAE(SaeConfig(d_model=d, n_latents=64, k=4), generator=gen)
    dead = torch.zeros(64, dtype=torch.bool)
    loss = step_loss(sae, x, layer, n_layers, dead, k_aux=0, loss_space=loss_space, measure_raw=True)
    x_hat = loss.out.x_hat.detach().double().numpy()
    raw = _fvu_numpy(x.double().numpy(), x_hat, layer.numpy(), n_layers)
    std = _fvu_numpy(
        loss.out.x_std.detach().double().numpy(), loss.out.x_hat_std.detach().double().numpy(), layer.numpy(), n_layers
    )
    np.testing.assert_allclose(loss.fvu_raw.double().numpy(), raw, rtol=1e-5)  # what fit logs and prints
    own = raw if loss_space == "raw" else std  # what the loss minimises
    assert float(loss.l_fvu.detach()) == pytest.approx(own.mean(), rel=1e-5)
    assert not np.allclose(raw, std, rtol=1e-3)  # the two spaces are different quantities here
