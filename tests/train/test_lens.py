"""The tuned lens (mlsae_train/lens*.py): its format, translate/untranslate against a dense reference, training
on a tiny Llama's cache (the last translator stays the identity, the tuned lens beats the logit lens, a crash and
resume gives the same translators), and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlsae_cache.core.errors import CorruptError, InputError, StoreError
from mlsae_cache.harvest import run_harvest
from mlsae_cache.store import Cache
from mlsae_train.cli import main
from mlsae_train.lens import (
    CFG_NAME,
    WEIGHTS_NAME,
    Lens,
    carry_lens,
    check_lens_fits,
    lens_of,
    load_lens,
    sae_lens_record,
    save_lens,
)
from mlsae_train.lens_eval import LENS_EVAL_JSON, LENS_KL_PNG, LensEvalConfig, LensEvalResult, run_eval_lens
from mlsae_train.lens_train import LensConfig, run_lens
from mlsae_train.state import STATE_NAME
from tests.cache.conftest import small_config

SMALL = {"batch_tokens": 64, "chunk_rows": 96, "block_chunks": 2, "epochs": 3, "device": "cpu", "lr": 3e-3}


class Crash(BaseException):
    pass


class Caches(NamedTuple):
    llama: Path
    neox: Path
    partial: Path  # blocks 0 and 1 of the Llama: not its last


@pytest.fixture(scope="module")
def caches(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Caches:
    root = tmp_path_factory.mktemp("lens")
    opts = {"dtype": "float32", "max_tokens": 1024, "chunk_tokens": 128}
    run_harvest(small_config(root / "llama", tiny_models["llama"], **opts))
    run_harvest(small_config(root / "neox", tiny_models["gpt_neox"], **opts))
    run_harvest(small_config(root / "partial", tiny_models["llama"], layers=(0, 1), **opts))
    return Caches(root / "llama", root / "neox", root / "partial")


@pytest.fixture(scope="module")
def trained(caches: Caches, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "lens"
    run_lens(LensConfig(caches.llama, out, train_tokens=768, **SMALL))
    return out


def random_lens(layers: tuple[int, ...], d: int, seed: int = 0, only: int | None = None) -> Lens:
    """Small random translators (zero except at block `only` when given)."""
    g = torch.Generator().manual_seed(seed)
    weight = 0.1 * torch.randn(len(layers), d, d, generator=g)
    bias = torch.randn(len(layers), d, generator=g)
    if only is not None:
        keep = torch.tensor([layer == only for layer in layers])
        weight, bias = weight * keep[:, None, None], bias * keep[:, None]
    return Lens(layers, weight, bias)


# ---------------------------------------------------------------------------------------------- the Lens object


def test_translate_and_untranslate_match_a_dense_numpy_reference() -> None:
    lens = random_lens((0, 3, 5), 8)
    x = torch.randn(50, 8)
    positions = torch.randint(0, 3, (50,))
    got = lens.translate(x, positions)
    a, b, xs = lens.weight.double().numpy(), lens.bias.double().numpy(), x.double().numpy()
    want = np.stack([xs[i] + a[p] @ xs[i] + b[p] for i, p in enumerate(positions.tolist())])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    back = np.stack([np.linalg.solve(np.eye(8) + a[p], want[i] - b[p]) for i, p in enumerate(positions.tolist())])
    np.testing.assert_allclose(lens.untranslate(got, positions).numpy(), back, rtol=1e-5, atol=1e-5)


def test_the_inverse_round_trip_is_exact_to_float_precision() -> None:
    lens = random_lens((0, 1, 2), 32, seed=1)
    x = 100 * torch.randn(200, 32)
    for p in range(3):
        err = (lens.untranslate(lens.translate(x, p), p) - x).abs().max() / x.abs().max()
        assert err < 1e-5, (p, float(err))


def test_the_identity_lens_changes_nothing_bit_for_bit() -> None:
    x = torch.randn(64, 16, dtype=torch.float16)
    lens = Lens.identity((0, 1), 16)
    assert torch.equal(lens.translate(x, torch.randint(0, 2, (64,))), x.float())
    assert torch.equal(lens.untranslate(x, 1), x.float())


def test_select_lines_positions_up_with_other_blocks() -> None:
    lens = random_lens((0, 1, 2), 4)
    picked = lens.select((2, 0))
    assert picked.layers == (2, 0)
    x = torch.randn(5, 4)
    assert torch.equal(picked.translate(x, 0), lens.translate(x, 2))
    with pytest.raises(InputError, match="no translator for blocks \\[7\\]"):
        lens.select((7,))


# ---------------------------------------------------------------------------------------------- the format


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    lens = random_lens((0, 1, 2), 8)
    save_lens(lens, tmp_path / "lens", {"finished": True, "note": "x"})
    back = load_lens(tmp_path / "lens")
    assert back.layers == (0, 1, 2) and torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    cfg = json.loads((tmp_path / "lens" / CFG_NAME).read_text())
    assert cfg["format"] == "mlsae-lens" and cfg["version"] == 1 and cfg["d_model"] == 8 and cfg["note"] == "x"
    assert back.fingerprint and len(back.fingerprint) == 16


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"format": "mlsae-sae"}, StoreError, "not an mlsae lens"),
        ({"version": 2}, StoreError, "format version 2"),
        ({"save_id": "other"}, CorruptError, "a save was interrupted"),
    ],
    ids=["foreign", "newer", "torn"],
)
def test_load_refuses_an_invalid_lens(tmp_path: Path, change: dict, error: type, match: str) -> None:
    save_lens(random_lens((0,), 4), tmp_path / "lens", {})
    cfg = json.loads((tmp_path / "lens" / CFG_NAME).read_text())
    (tmp_path / "lens" / CFG_NAME).write_text(json.dumps({**cfg, **change}))
    with pytest.raises(error, match=match):
        load_lens(tmp_path / "lens")


def test_an_sae_directory_carries_its_lens_and_detects_a_swapped_one(tmp_path: Path) -> None:
    save_lens(random_lens((0, 1), 4), tmp_path / "lens", {})
    lens = load_lens(tmp_path / "lens")
    carry_lens(lens, tmp_path / "sae")
    sae_cfg = {"tuned_lens": sae_lens_record(lens)}
    carried = lens_of(tmp_path / "sae", sae_cfg)
    assert carried is not None and torch.equal(carried.weight, lens.weight)
    assert lens_of(tmp_path / "sae", {"tuned_lens": None}) is None
    save_lens(random_lens((0, 1), 4, seed=5), tmp_path / "sae" / "lens", {})
    with pytest.raises(CorruptError, match="not the one SAE"):
        lens_of(tmp_path / "sae", sae_cfg)


# ---------------------------------------------------------------------------------------------- training


def test_the_last_translator_stays_the_identity_and_the_others_learn(trained: Path) -> None:
    lens = load_lens(trained)
    assert lens.layers == (0, 1, 2) and lens.meta["finished"] is True
    assert not lens.weight[-1].any() and not lens.bias[-1].any()
    assert all(lens.weight[i].abs().max() > 0 for i in (0, 1))
    assert lens.meta["train_tokens"] == 768 and len(lens.meta["head_fingerprint"]) == 16


def test_the_tuned_lens_beats_the_logit_lens_on_held_out_tokens(trained: Path, caches: Caches) -> None:
    result = run_eval_lens(LensEvalConfig(trained, caches.llama, device="cpu"))
    assert result.start == 768 and result.held_out is True and result.n_tokens > 200
    assert result.kl_tuned[-1] < 1e-6 and result.kl_logit[-1] < 1e-6
    assert all(t < g for t, g in zip(result.kl_tuned[:-1], result.kl_logit[:-1], strict=True)), result


@pytest.mark.parametrize("crash_step", [2, 7])
def test_a_crash_and_resume_gives_the_same_translators(caches: Caches, tmp_path: Path, crash_step: int) -> None:
    opts = {**SMALL, "checkpoint_every_steps": 3, "train_tokens": 768}
    run_lens(LensConfig(caches.llama, tmp_path / "ref", **opts))
    steps = {"n": 0}

    def crash(n: int, **facts: object) -> None:
        steps["n"] += bool(n)
        if steps["n"] == crash_step:
            raise Crash

    with pytest.raises(Crash):
        run_lens(LensConfig(caches.llama, tmp_path / "run", **opts), crash)
    result = run_lens(LensConfig(caches.llama, tmp_path / "run", **opts))
    assert not result.noop
    ref, run = load_lens(tmp_path / "ref"), load_lens(tmp_path / "run")
    assert torch.equal(ref.weight, run.weight) and torch.equal(ref.bias, run.bias)
    assert run_lens(LensConfig(caches.llama, tmp_path / "run", **opts)).noop


def test_a_sigkill_and_resume_gives_the_same_translators(caches: Caches, tmp_path: Path) -> None:
    opts = ["--epochs", "12", "--batch-tokens", "64", "--chunk-rows", "96", "--lr", "0.003", "--device", "cpu"]
    opts += ["--train-tokens", "768", "--checkpoint-every-steps", "3"]
    cmd = [sys.executable, "-m", "mlsae_train", "--quiet", "lens", str(caches.llama)]
    subprocess.run([*cmd, str(tmp_path / "ref"), *opts], check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, str(tmp_path / "run"), *opts], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / STATE_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "training finished before it could be killed"
    assert not load_lens(tmp_path / "run").meta["finished"]
    subprocess.run([*cmd, str(tmp_path / "run"), *opts], check=True, capture_output=True)
    ref, run = load_lens(tmp_path / "ref"), load_lens(tmp_path / "run")
    assert torch.equal(ref.weight, run.weight) and torch.equal(ref.bias, run.bias)


def test_cli_trains_and_evaluates_a_lens(caches: Caches, tmp_path: Path) -> None:
    opts = ["--epochs", "1", "--batch-tokens", "64", "--train-tokens", "768", "--device", "cpu"]
    ran = CliRunner().invoke(main, ["--quiet", "lens", str(caches.llama), str(tmp_path / "lens"), *opts])
    assert ran.exit_code == 0, ran.output
    assert load_lens(tmp_path / "lens").meta["finished"] is True
    args = ["--quiet", "eval-lens", str(tmp_path / "lens"), str(caches.llama), "--out", str(tmp_path / "ev")]
    ran = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert ran.exit_code == 0, ran.output
    result = LensEvalResult.read(tmp_path / "ev" / LENS_EVAL_JSON)
    assert result.layer == [0, 1, 2] and (tmp_path / "ev" / LENS_KL_PNG).stat().st_size > 1000
    assert "tuned KL" in ran.output and "held out" in ran.output


# ---------------------------------------------------------------------------------------------- bad input


def test_a_cache_without_the_last_block_is_refused(caches: Caches, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="stores blocks up to 1, but the model's last block is 2"):
        run_lens(LensConfig(caches.partial, tmp_path / "lens", **SMALL))
    assert not (tmp_path / "lens").exists()


def test_a_lens_of_another_model_or_without_the_layers_is_refused(
    trained: Path, caches: Caches, tiny_models: dict[str, Path]
) -> None:
    lens = load_lens(trained)
    with pytest.raises(InputError, match="was trained for model"):
        check_lens_fits(lens, Cache(caches.neox), (0, 1, 2))
    with pytest.raises(InputError, match="no translator for blocks \\[3\\]"):
        check_lens_fits(lens, Cache(caches.llama), (0, 3))
    with pytest.raises(InputError, match="another model's final norm"):
        run_eval_lens(LensEvalConfig(trained, caches.llama, model=str(tiny_models["gpt_neox"]), device="cpu"))


def test_an_unfinished_lens_is_refused(caches: Caches, tmp_path: Path) -> None:
    save_lens(Lens.identity((0, 1, 2), 32), tmp_path / "lens", {"finished": False})
    with pytest.raises(InputError, match="unfinished"):
        check_lens_fits(load_lens(tmp_path / "lens"), Cache(caches.llama), (0,))


def test_a_lens_run_of_other_settings_is_refused(trained: Path, caches: Caches) -> None:
    before = (trained / WEIGHTS_NAME).read_bytes()
    with pytest.raises(InputError, match="other settings"):
        run_lens(LensConfig(caches.llama, trained, **{**SMALL, "lr": 0.5}, train_tokens=768))
    assert (trained / WEIGHTS_NAME).read_bytes() == before


# ---------------------------------------------------------------------------------------------- tuned-lens library


def library_lens(path: Path, n_layers: int, d: int) -> Path:
    """A lens in the tuned-lens library's layout: config.json and params.pt of translators 0..n_layers-1."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    state = {}
    for i in range(n_layers):
        state[f"{i}.weight"], state[f"{i}.bias"] = torch.randn(d, d, generator=g), torch.randn(d, generator=g)
    torch.save(state, path / "params.pt")
    config = {"base_model_name_or_path": "tiny", "d_model": d, "num_hidden_layers": n_layers, "bias": True}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(("indexing", "shift"), [("shifted", 1), ("reference", 0)], ids=["shifted", "reference"])
def test_import_lens_gives_each_block_the_translator_of_its_indexing(
    caches: Caches, tmp_path: Path, indexing: str, shift: int
) -> None:
    src = library_lens(tmp_path / "src", 3, 32)
    args = ["--quiet", "import-lens", str(src), str(tmp_path / "out"), "--cache", str(caches.llama)]
    ran = CliRunner().invoke(main, [*args, "--indexing", indexing])
    assert ran.exit_code == 0, ran.output
    lens, state = load_lens(tmp_path / "out"), torch.load(src / "params.pt")
    assert lens.layers == (0, 1, 2) and lens.meta["indexing"] == indexing
    h = torch.randn(7, 32)
    for block in range(3):
        i = block + shift
        # the library's own transform: h + translator_i(h), a Linear with weight [out, in]
        want = h + h @ state[f"{i}.weight"].T + state[f"{i}.bias"] if i < 3 else h
        torch.testing.assert_close(lens.translate(h, block), want)


def test_import_lens_refuses_a_lens_of_another_model(caches: Caches, tmp_path: Path) -> None:
    src = library_lens(tmp_path / "src", 3, 16)
    args = ["--quiet", "import-lens", str(src), str(tmp_path / "out"), "--cache", str(caches.llama)]
    ran = CliRunner().invoke(main, args)
    assert ran.exit_code == 2 and "d_model 16" in ran.output and len(ran.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
