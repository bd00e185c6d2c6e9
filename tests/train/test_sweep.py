"""Sweeps: each member equals its own single fit, a killed or crashed sweep resumes to the uninterrupted result, a
finished member is never retrained, bad sweep tables are one-line errors that write nothing; fit's --data-seed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from mlsae_train import trainer
from mlsae_train.checkpoint import load_sae
from mlsae_train.cli import main
from mlsae_train.config import TrainConfig
from mlsae_train.state import STATE_NAME, load_state, save_state
from mlsae_train.sweep import SweepConfig, member_name, run_sweep
from mlsae_train.trainer import fit
from tests.cache.test_resume import store_files
from tests.train.test_trainer import assert_same_weights, weights

SMALL: dict[str, Any] = {
    "batch_rows": 128,
    "max_rows": 3000,
    "checkpoint_every_rows": 1000,
    "log_every_steps": 5,
    "block_units": 4,
    "device": "cpu",
    "dead_after_rows": 500,
}
CLI_SMALL = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]


class Crash(BaseException):
    pass


def log_lines(out: Path) -> list[dict[str, Any]]:
    """The metrics log without the rate, which differs between any two runs."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "rows_per_s"} for line in lines]


def assert_same_run(a: Path, b: Path) -> None:
    """The same weights bit for bit, the same metrics log and the same cfg.json (but for its save_id)."""
    assert_same_weights(a, b)
    assert log_lines(a) == log_lines(b)
    cfg_a, cfg_b = (json.loads((p / "cfg.json").read_text()) for p in (a, b))
    # what differs between two saves of the same weights: the save id, and the checksums of what records it
    per_save = ("save_id", "weights_crc32c", "crc32c")
    assert {k: v for k, v in cfg_a.items() if k not in per_save} == {
        k: v for k, v in cfg_b.items() if k not in per_save
    }


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(main, ["--quiet", *args], catch_exceptions=False)


@pytest.mark.parametrize(
    ("grid", "data_seed"),
    [
        ({"expansion_factor": (2, 4), "k": (2, 4)}, None),
        ({"lr": (1e-4, 1e-3), "seed": (1, 2)}, 0),
        ({"seed": (3,)}, None),
    ],
    ids=["expansion-and-k", "lr-and-seed-on-data-seed-0", "one-seed-is-a-plain-fit"],
)
def test_each_member_equals_its_single_fit(
    tmp_path: Path, random_cache: Path, grid: dict[str, tuple[Any, ...]], data_seed: int | None
) -> None:
    """Members of several seeds share the row order of --data-seed; a sweep of one seed, without --data-seed, is
    the plain fit of that seed."""
    cfg = SweepConfig(cache=random_cache, out=tmp_path / "sweep", data_seed=data_seed, **grid, **SMALL)
    result = run_sweep(cfg)
    assert sorted(result.members) == sorted(p.name for p in cfg.out.iterdir())
    assert result.rows == 3072 and all(r.rows == 3072 and r.steps == 24 for r in result.members.values())
    for name, member in cfg.members().items():
        settings = {k: getattr(member, k) for k in ("expansion_factor", "k", "lr", "seed")}
        assert name == member_name(**settings)
        single = tmp_path / "single" / name
        fit(TrainConfig(cache=random_cache, out=single, data_seed=data_seed, **settings, **SMALL))
        assert_same_run(cfg.out / name, single)
        load_sae(cfg.out / name)  # a finished SAE directory, as fit writes it


def test_a_seed_s_member_on_data_seed_0_is_not_the_fit_of_seed_s_alone(tmp_path: Path, random_cache: Path) -> None:
    """--data-seed takes effect: the fit of seed 1 shuffles its rows by seed 1 unless given --data-seed 0."""
    shape: dict[str, Any] = {"expansion_factor": 2, "k": 4}
    sweep = SweepConfig(cache=random_cache, out=tmp_path / "sweep", expansion_factor=(2,), k=(4,), seed=(0, 1), **SMALL)
    run_sweep(sweep)
    fit(TrainConfig(cache=random_cache, out=tmp_path / "own-order", seed=1, **shape, **SMALL))
    member = weights(tmp_path / "sweep" / member_name(2, 4, 1e-4, 1))
    assert not torch.equal(member["W_dec"], weights(tmp_path / "own-order")["W_dec"])


def test_a_member_that_crashed_a_checkpoint_behind_catches_up(
    tmp_path: Path, random_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between two members' checkpoints leaves them at different steps; the re-run continues each from its
    own and ends with every member equal to the uninterrupted sweep's."""
    grid = {"expansion_factor": (2, 4), "k": (4,)}
    ref = run_sweep(SweepConfig(cache=random_cache, out=tmp_path / "ref", **grid, **SMALL))
    cfg = SweepConfig(cache=random_cache, out=tmp_path / "run", **grid, **SMALL)
    second = cfg.out / member_name(4, 4, 1e-4, 0)
    real, calls = trainer.checkpoint, {"n": 0}

    def crash_on_the_second_members_second_checkpoint(run: trainer.Run, record: dict[str, Any]) -> None:
        if Path(run.cfg.out) == second:
            calls["n"] += 1
            if calls["n"] == 2:
                raise Crash
        real(run, record)

    monkeypatch.setattr(trainer, "checkpoint", crash_on_the_second_members_second_checkpoint)
    with pytest.raises(Crash):
        run_sweep(cfg)
    monkeypatch.setattr(trainer, "checkpoint", real)
    steps = {name: load_state(cfg.out / name)["step"] for name in ref.members}
    assert steps == {member_name(2, 4, 1e-4, 0): 16, second.name: 8}
    run_sweep(cfg)
    for name in ref.members:
        assert_same_run(cfg.out / name, tmp_path / "ref" / name)


def test_resume_after_sigkill_equals_an_uninterrupted_sweep(tmp_path: Path, random_cache: Path) -> None:
    opts = [*CLI_SMALL, "--max-rows", "30000", "--checkpoint-every-rows", "3000", "--expansion-factor", "2,4"]
    opts += ["--k", "4"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    cmd = [sys.executable, "-m", "mlsae_train", "--quiet", "sweep", str(random_cache)]
    subprocess.run([*cmd, str(ref), *opts], check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, str(run), *opts], stderr=subprocess.PIPE)
    first = run / member_name(2, 4, 1e-4, 0) / STATE_NAME
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the sweep finished before it could be killed"
    subprocess.run([*cmd, str(run), *opts], check=True, capture_output=True)
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in run.iterdir()) and len(names) == 2
    for name in names:
        assert_same_run(run / name, ref / name)


def test_the_command_writes_members_that_eval_takes_and_never_retrains_one(tmp_path: Path, random_cache: Path) -> None:
    """From a preset's [sweep] table; a re-run changes no file; a wider grid trains only its new member."""
    preset = tmp_path / "sweep.toml"
    preset.write_text('[sweep]\nexpansion_factor = 2\nk = [2, 4]\nlr = [1e-4]\ndevice = "cpu"\n')
    out = tmp_path / "sweep"
    args = ["sweep", str(random_cache), str(out), "--config", str(preset), *CLI_SMALL]
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    assert "wrote 2 of 2 SAEs" in result.output and "rows/s per SAE" in result.output
    names = [member_name(2, k, 1e-4, 0) for k in (2, 4)]
    assert sorted(p.name for p in out.iterdir()) == names
    for name, k in zip(names, (2, 4), strict=True):
        sae, cfg = load_sae(out / name)
        assert sae.cfg.k == k and cfg["finished"] and cfg["data_seed"] == 0 and cfg["rows_trained"] == 3072
    ev = invoke("eval", str(out / names[0]), str(random_cache), "--out", str(tmp_path / "eval.json"), "--device", "cpu")
    assert ev.exit_code == 0 and json.loads((tmp_path / "eval.json").read_text())["layer"] == [0, 1, 2], ev.stderr
    before = store_files(out)
    again = invoke(*args)
    assert again.exit_code == 0 and again.output.count("nothing to do") == 2 and "wrote 0 of 2" in again.output
    assert store_files(out) == before
    wider = invoke(*args, "--k", "2,4,8")
    assert wider.exit_code == 0 and "wrote 1 of 3 SAEs" in wider.output, wider.stderr
    assert {p: b for p, b in store_files(out).items() if not p.startswith(member_name(2, 8, 1e-4, 0))} == before
    fit(TrainConfig(cache=random_cache, out=tmp_path / "single", expansion_factor=2, k=8, **SMALL))
    assert_same_run(out / member_name(2, 8, 1e-4, 0), tmp_path / "single")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("k = []", "lists no value"),
        ("k = [4, 4]", "--k lists 4 twice"),
        ('lr = ["fast"]', "is not a list of float values"),
        ("k = [0, 4]", "--k must be at least 1, got 0"),
        ("expansion_factor = 1\nk = [4, 100]", "exceeds the SAE's 16 latents"),
        ("lr = [1e-4, 1.0000001e-4]", "would share OUT/x64-k32-lr0.0001-seed0"),
        ("members = 3", "[sweep] has no option 'members'"),
        ("resume = true", "[sweep] has no option 'resume'"),
        ("data_seed = [0, 1]", "data_seed = [0, 1] is invalid"),
        ("layers = [0, 5]", "blocks [5] are not in the cache"),
    ],
    ids=[
        "empty-list",
        "value-twice",
        "not-a-number",
        "k-zero",
        "k-over-n-latents",
        "names-collide",
        "unknown-key",
        "no-resume",
        "data-seed-list",
        "layer-not-in-cache",
    ],
)
def test_bad_sweep_tables_are_one_line_errors_that_write_nothing(
    tmp_path: Path, random_cache: Path, table: str, message: str
) -> None:
    preset = tmp_path / "bad.toml"
    preset.write_text(f"[sweep]\n{table}\n")
    out = tmp_path / "out"
    result = invoke("sweep", str(random_cache), str(out), "--config", str(preset), *CLI_SMALL)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not out.exists()


def test_a_member_holding_another_run_stops_the_sweep_before_anything_is_written(
    tmp_path: Path, random_cache: Path
) -> None:
    out = tmp_path / "sweep"
    fit(
        TrainConfig(cache=random_cache, out=out / member_name(2, 4, 1e-4, 0), expansion_factor=2, k=4, lr=1e-3, **SMALL)
    )
    before = store_files(out)
    result = invoke("sweep", str(random_cache), str(out), "--expansion-factor", "2", "--k", "2,4", *CLI_SMALL)
    assert result.exit_code == 2 and "holds a run of other settings (lr 0.001 -> 0.0001" in result.stderr
    assert store_files(out) == before


def test_data_seed_equal_to_the_seed_or_unrecorded_is_the_same_run(tmp_path: Path, random_cache: Path) -> None:
    """`--seed 3` and `--seed 3 --data-seed 3` are one run, and so is a run recorded before --data-seed existed;
    another data seed is another run."""
    out = tmp_path / "sae"
    base = ["fit", str(random_cache), str(out), "--expansion-factor", "2", "--k", "4", "--seed", "3", *CLI_SMALL]
    assert invoke(*base).exit_code == 0
    assert invoke(*base, "--data-seed", "3").output.strip().endswith("nothing to do")
    state = load_state(out)
    del state["record"]["data_seed"]  # as a run written before the option was
    save_state(out, state)
    assert invoke(*base).output.strip().endswith("nothing to do")
    other = invoke(*base, "--data-seed", "0")
    assert other.exit_code == 2 and "data_seed 3 -> 0" in other.stderr
