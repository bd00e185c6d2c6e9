"""What a new user meets first, one test per point of the first-hour review: progress that tells the truth on a
terminal and in a log, resume and overwrite that work alike everywhere, unfinished outputs refused, files that
colleagues can read, evaluation on held-out tokens by default, useless results flagged, errors whose advice is
right, one vocabulary of options, a harvest that checks the disk first, and examples that show where a latent
fires."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlsae_cache.cli import main as cache_main
from mlsae_cache.core.lock import StoreLock
from mlsae_train.cli import fit_summary
from mlsae_train.cli import main as train_main
from mlsae_train.config import TrainConfig
from mlsae_train.trainer import FitResult
from tests.cache.conftest import small_config

FIT = ["--expansion-factor", "4", "--k", "4", "--batch-rows", "128", "--block-units", "4", "--device", "cpu"]


def cli(package: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A command run as a user runs it, off a terminal (stdout and stderr captured)."""
    return subprocess.run([sys.executable, "-m", package, *args], capture_output=True, text=True, timeout=300, env=env)


def on_terminal(package: str, *args: str) -> str:
    """A command run in a pseudo-terminal; everything it printed there."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", package, *args], stdin=follower, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(leader)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


# ---------------------------------------------------------------------------------------------- 1. progress


def test_fit_on_a_terminal_shows_total_eta_and_the_running_fvu(tmp_path: Path, random_cache: Path) -> None:
    shown = on_terminal("mlsae_train", "fit", str(random_cache), str(tmp_path / "sae"), *FIT, "--max-rows", "4k")
    assert re.search(r"fit: +\d+%.*\| *[\d.]+k?/4\.10k", shown), shown  # a bar with its total: 32 steps of 128
    assert "fvu" in shown and "l0" in shown and "dead" in shown
    assert re.search(r"<\d\d:\d\d", shown)  # tqdm's ETA
    assert "wrote" in shown and "next: mlsae-train eval" in shown


def test_off_a_terminal_progress_is_a_log_line_every_interval(tmp_path: Path, random_cache: Path) -> None:
    out = tmp_path / "sae"
    done = cli("mlsae_train", "fit", str(random_cache), str(out), *FIT, "--max-rows", "4k", "--log-interval", "0.01")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if " fit: " in line]
    assert len(lines) >= 3, done.stderr
    assert re.search(r"fit: [\d,]+/4,096 rows \(\d+%\); [\d,.]+M? rows/s, ETA \d+m\d\ds", lines[0]), lines[0]
    assert "fvu" in lines[-1] and lines[-1].startswith("20")  # timestamped for a log file
    assert done.stdout.startswith("wrote")
    evaluated = cli("mlsae_train", "eval", str(out), str(random_cache), "--start", "0", "--log-interval", "0.01")
    assert evaluated.returncode == 0, evaluated.stderr
    eval_lines = [line for line in evaluated.stderr.splitlines() if " eval: " in line]
    assert eval_lines and all(re.search(r"eval: [\d,.]+k?/[\d,.]+k? tokens? \(\d+%\)", x) for x in eval_lines), (
        eval_lines
    )


def test_a_resumed_harvest_bar_starts_where_it_resumes(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    out, model = tmp_path / "cache", tiny_models["llama"]
    args = ["harvest", str(out), "--model", str(model), "--context-length", "32", "--chunk-tokens", "128"]
    assert cli("mlsae_cache", *args, "--max-tokens", "512").returncode == 0
    shown = on_terminal("mlsae_cache", *args, "--max-tokens", "1024")
    assert "resumed at 512" in shown and "/1.02k" in shown, shown


# ---------------------------------------------------------------------------------------------- 2. resume


def test_ctrl_c_on_fit_saves_a_checkpoint_and_the_same_command_continues(tmp_path: Path, random_cache: Path) -> None:
    out = tmp_path / "sae"
    args = ["-m", "mlsae_train", "fit", str(random_cache), str(out), *FIT, "--max-rows", "400k"]
    # A test run started in the background (nohup, `&`) ignores SIGINT and its children inherit that: give the fit
    # the default disposition, as a terminal would, so that Python turns the signal into KeyboardInterrupt.
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or (out / "metrics.jsonl").stat().st_size == 0:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    last = err.splitlines()[-1]  # off a terminal, the progress log's last line comes before it
    assert proc.returncode == 130 and err.count("Error") == 1 and "Traceback" not in err, err
    assert re.match(r"Error: interrupted at [\d,]+ of 400,000 rows; the checkpoint of step \d+ is saved", last), err
    assert "re-run the same command to continue" in last
    again = cli("mlsae_train", "fit", str(random_cache), str(out), *FIT, "--max-rows", "400k", "--quiet")
    assert again.returncode == 0, again.stderr
    assert "400,000 rows" in again.stdout


def test_resume_reads_the_runs_own_settings(tmp_path: Path, random_cache: Path) -> None:
    out = tmp_path / "sae"
    runner = CliRunner()
    first = runner.invoke(train_main, ["fit", str(random_cache), str(out), *FIT, "--max-rows", "1k"])
    assert first.exit_code == 0, first.output
    longer = runner.invoke(train_main, ["fit", str(random_cache), str(out), "--resume", "--max-rows", "2k"])
    assert longer.exit_code == 0 and "2,048 rows" in longer.output, longer.output
    changed = runner.invoke(train_main, ["fit", str(random_cache), str(out), "--resume", "--k", "8"])
    assert changed.exit_code == 2 and "--k 8 (the run has 4)" in changed.output
    other = runner.invoke(train_main, ["fit", str(random_cache), str(out), *FIT[:2], "--k", "8"])
    assert other.exit_code == 2 and "holds a run of other settings" in other.output and "--overwrite" in other.output
    replaced = runner.invoke(train_main, ["fit", str(random_cache), str(out), *FIT, "--max-rows", "512", "--overwrite"])
    assert replaced.exit_code == 0 and "512 rows" in replaced.output


# ---------------------------------------------------------------------------------------------- 3. finished


def test_an_unfinished_checkpoint_is_refused_unless_asked(tmp_path: Path, random_cache: Path) -> None:
    from mlsae_analyze.cli import main as analyze_main

    sae, latents = tmp_path / "sae", tmp_path / "latents"
    cfg = TrainConfig(cache=random_cache, out=sae, expansion_factor=4, k=4, batch_rows=128, max_rows=512, device="cpu")
    from mlsae_train.trainer import fit

    fit(cfg)
    import json

    cfg_json = json.loads((sae / "cfg.json").read_text())
    assert cfg_json["finished"] is True
    (sae / "cfg.json").write_text(json.dumps({**cfg_json, "finished": False}))  # as a fit stopped half-way leaves it
    runner = CliRunner()
    stopped = runner.invoke(analyze_main, ["encode", str(sae), str(random_cache), str(latents)])
    assert stopped.exit_code == 2 and "its fit stopped after 512 of 512 rows" in stopped.output, stopped.output
    with StoreLock(sae):  # as a running fit holds it
        running = runner.invoke(analyze_main, ["encode", str(sae), str(random_cache), str(latents)])
    assert running.exit_code == 2 and "a fit is training it now" in running.output and not latents.exists()
    allowed = runner.invoke(analyze_main, ["encode", str(sae), str(random_cache), str(latents), "--allow-unfinished"])
    assert allowed.exit_code == 0, allowed.output


# ---------------------------------------------------------------------------------------------- 6. file modes


def test_outputs_follow_the_umask(tmp_path: Path, random_cache: Path) -> None:
    from mlsae_analyze.cosine import CosineConfig, run_cosine

    old = os.umask(0o022)
    try:
        cfg = TrainConfig(cache=random_cache, out=tmp_path / "sae", expansion_factor=4, k=4, batch_rows=128,
                          max_rows=256, device="cpu")  # fmt: skip
        from mlsae_train.trainer import fit

        fit(cfg)
        run_cosine(CosineConfig(cache=random_cache, out=tmp_path / "cos"))
    finally:
        os.umask(old)
    assert (tmp_path / "sae" / "sae.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "cos").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------------------------------------- 7, 8. defaults


def test_eval_defaults_to_the_held_out_tokens(tmp_path: Path, random_cache: Path) -> None:
    runner = CliRunner()
    sae = tmp_path / "sae"
    fitted = runner.invoke(train_main, ["fit", str(random_cache), str(sae), *FIT, "--train-tokens", "1.5k"])
    assert fitted.exit_code == 0, fitted.output
    result = runner.invoke(train_main, ["eval", str(sae), str(random_cache), "--device", "cpu"])
    assert result.exit_code == 0 and "tokens [1,500, 2,000) (held out from training)" in result.output


def test_numbers_that_cannot_mean_what_they_seem_are_flagged(tmp_path: Path) -> None:
    cfg = TrainConfig(cache=tmp_path, out=tmp_path / "sae", dead_after_rows=10_000_000)
    result = FitResult(tmp_path / "sae", 4096, 1, {"fvu": 3.6, "l0": 32.0, "dead_fraction": 0.0})
    text = fit_summary(cfg, result, 2.0)
    assert "FVU 3.6 > 1: worse than predicting each layer's mean" in text
    assert "dead fraction not measurable: 4,096 rows trained < --dead-after-rows 10,000,000" in text


# ---------------------------------------------------------------------------------------------- 9. errors


@pytest.mark.parametrize(
    ("package", "args", "message"),
    [
        ("mlsae_train", ["fit", "{sae}", "{cache}"], "is an mlsae SAE checkpoint, not an mlsae cache (check the order"),
        ("mlsae_analyze", ["encode", "{cache}", "{sae}", "{tmp}/lat"], "is an mlsae cache, not an SAE checkpoint"),
        ("mlsae_train", ["fit", "{cache}", "{tmp}/x", "--device", "gpu"], "--device 'gpu' is not a device"),
        ("mlsae_analyze", ["encode", "{sae}", "{cache}", "{tmp}/lat", "--device", "gpu"], "--device 'gpu' is not"),
        ("mlsae_analyze", ["report", "{tmp}/r", "--variance", "{tmp}"], "is a directory of other files"),
        ("mlsae_train", ["fit", "{cache}", "{tmp}/x", "--layers", "0,,1"], "is not 'all' or a list of block"),
    ],
    ids=["fit-swapped", "encode-swapped", "fit-gpu", "encode-gpu", "report-not-variance", "layers-empty-part"],
)
def test_errors_say_what_a_wrong_input_is(
    tmp_path: Path, random_cache: Path, package: str, args: list[str], message: str
) -> None:
    sae = tmp_path / "sae"
    from mlsae_train.trainer import fit

    fit(TrainConfig(cache=random_cache, out=sae, expansion_factor=4, k=4, batch_rows=128, max_rows=256, device="cpu"))
    (tmp_path / "other").write_text("x")
    given = [a.format(sae=sae, cache=random_cache, tmp=tmp_path) for a in args]
    done = cli(package, *given)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "lat").exists() and not (tmp_path / "x").exists()


def test_a_harvest_still_running_is_named_as_such(tmp_path: Path, random_cache: Path) -> None:
    import zarr

    from mlsae_cache.core.zarrstore import set_root_attribute

    group = zarr.open_group(str(random_cache), mode="r+")
    meta = dict(group.attrs["mlsae"])
    set_root_attribute(group, {**meta, "complete": False})  # sealed, as a writer leaves it
    try:
        with StoreLock(random_cache, shared=True):  # as the workers of a running harvest hold it
            result = CliRunner().invoke(train_main, ["fit", str(random_cache), str(tmp_path / "sae"), *FIT])
        assert result.exit_code == 2 and "is being written now" in result.output and "wait for it" in result.output
        stopped = CliRunner().invoke(train_main, ["fit", str(random_cache), str(tmp_path / "sae"), *FIT])
        assert "its writer stopped" in stopped.output and "re-running the same `mlsae-cache harvest`" in stopped.output
    finally:
        group.attrs["mlsae"] = meta


# ---------------------------------------------------------------------------------------------- 10. vocabulary


@pytest.mark.parametrize("value", ["2000", "2k", "2e3", "2_000"])
def test_counts_are_accepted_as_people_write_them(tmp_path: Path, random_cache: Path, value: str) -> None:
    result = CliRunner().invoke(
        train_main, ["fit", str(random_cache), str(tmp_path / "sae"), *FIT, "--max-rows", value]
    )
    assert result.exit_code == 0 and "2,048 rows" in result.output, result.output


def test_layers_take_ranges_and_batch_size_is_batch_windows(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    out = tmp_path / "cache"
    args = ["harvest", str(out), "--model", str(tiny_models["llama"]), "--context-length", "32", "--max-tokens", "256"]
    result = CliRunner().invoke(cache_main, [*args, "--layers", "0-1", "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    from mlsae_cache.store import Cache

    assert Cache(out).layers == (0, 1) and Cache(out).meta.batch_size == 2
    too_long = CliRunner().invoke(cache_main, ["harvest", str(tmp_path / "c2"), "--model", str(tiny_models["llama"]),
                                               "--context-length", "4096", "--device", "cpu"])  # fmt: skip
    assert too_long.exit_code == 2 and "more than model" in too_long.output and "512 positions" in too_long.output


# ---------------------------------------------------------------------------------------------- 5. preflight


def test_harvest_plans_checks_the_disk_and_dry_runs(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import namedtuple

    from mlsae_cache import harvest as harvest_module

    out = tmp_path / "cache"
    args = ["harvest", str(out), "--model", str(tiny_models["llama"]), "--context-length", "32", "--max-tokens", "1k"]
    dry = CliRunner().invoke(cache_main, [*args, "--dry-run", "--device", "cpu"])
    assert dry.exit_code == 0 and "plan: 1,000 tokens at 232 bytes per token: 0.2 MB to write" in dry.output
    assert "free on" in dry.output and not out.exists()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(harvest_module.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    full = CliRunner().invoke(cache_main, [*args, "--device", "cpu"])
    assert full.exit_code == 2 and "the harvest needs 0.2 MB but" in full.output and "1.0 MB free" not in full.output
    assert not out.exists()


def test_the_final_line_says_what_how_big_how_long_and_what_next(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    cfg = small_config(tmp_path / "cache", tiny_models["llama"])
    args = ["harvest", str(cfg.out), "--model", str(tiny_models["llama"]), "--context-length", "32",
            "--max-tokens", "256", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(cache_main, args)
    assert result.exit_code == 0
    assert re.search(r"wrote .*: 256 tokens x 3 layers\n[\d.]+ MB in \dm\d\ds; next: mlsae-train fit ", result.output)


# ---------------------------------------------------------------------------------------------- 11. examples


def test_examples_by_mean_layer_and_at_random_with_shaded_contexts(tmp_path: Path) -> None:
    from mlsae_analyze.example_pages import run_examples
    from mlsae_analyze.examples import ExamplesConfig, find_examples
    from tests.analyze.test_examples import dense, make_latents

    ds, latents = make_latents(tmp_path)
    a = dense(ds, False)
    found = find_examples(latents, ExamplesConfig(latents=latents.path, out=tmp_path / "o", mean_layer="4-7", top=30))
    mean = np.interp((np.arange(3)[:, None] * a.sum(1)).sum(0) / a.sum((0, 1)).clip(1e-9), [0, 1, 2], [1, 4, 7])
    want = {j for j in range(30) if a[:, :, j].sum() > 0 and 4 <= mean[j] <= 7}
    assert {s.latent for s in found} == want
    every_row = dense(ds, True)  # a context shows the latent's activation at every token, trainable or not
    for summary in found:
        for ex in summary.examples:
            rows = np.arange(ex.token - ex.focus, ex.token - ex.focus + len(ex.context))
            np.testing.assert_allclose(ex.context_values, every_row[ex.layer, rows, ex.latent], rtol=1e-6)
    cfg = ExamplesConfig(latents=latents.path, out=tmp_path / "pages", random=3, seed=1)
    result = run_examples(cfg)
    assert len(result.summaries) == 3
    page = (tmp_path / "pages" / "examples.html").read_text()
    assert page.count("<div class='profile'>") == 3 and "rgba(230,126,34," in page
    assert "3 latents drawn at random (seed 1)" in page
