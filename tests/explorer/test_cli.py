"""`mlsae-analyze index` and `explore` as commands: options one-to-one with their configs, one-line errors, the
URL and ssh line printed, loopback by default."""

from __future__ import annotations

import dataclasses
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mlsae_analyze.cli import main
from mlsae_analyze.explorer.build import IndexConfig
from mlsae_analyze.explorer.index import read_index_meta
from mlsae_analyze.explorer.serve import ExploreConfig
from tests.explorer.conftest import Server
from tests.explorer.stores import N_LATENTS, Stores

COMMON = {"debug", "quiet", "log_interval", "config", "version", "help"}
CONFIGS = {"index": IndexConfig, "explore": ExploreConfig}


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_options_match_the_config_and_all_have_help(name: str) -> None:
    command = main.commands[name]
    fields = {f.name for f in dataclasses.fields(CONFIGS[name])}
    assert {p.name for p in command.params if p.name not in COMMON} == fields
    assert [p.name for p in command.params if isinstance(p, click.Option) and not p.help] == []


def test_index_command_writes_then_finds_it_up_to_date(tmp_path: Path, stores: Stores) -> None:
    out = tmp_path / "index"
    args = ["index", str(stores.latents), str(out), "--variance", str(stores.variance), "--sae", str(stores.sae)]
    result = invoke("--quiet", *args, "--top", "5", "--no-logits")
    assert result.exit_code == 0, result.output
    assert f"explore it: mlsae-analyze explore {out}" in result.output and "no logit effects" in result.output
    meta = read_index_meta(out)
    assert (meta.top, meta.logits, meta.logits_note) == (5, 0, "the index was built with --no-logits")
    assert "--top 5" in meta.rebuild and "--no-logits" in meta.rebuild
    again = invoke("--quiet", *args, "--top", "5", "--no-logits")
    assert again.exit_code == 0 and "up to date" in again.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top", "0"], "--top must be an integer in [1, 1000], got 0"),
        (["--variance", "/nonexistent"], "does not exist"),
        (["--sae", "/nonexistent"], "does not exist"),
    ],
    ids=["top", "variance", "sae"],
)
def test_index_errors_are_one_line_and_write_nothing(tmp_path: Path, stores: Stores, extra: list, message: str) -> None:
    out = tmp_path / "index"
    args = ["index", str(stores.latents), str(out), "--variance", str(stores.variance), "--sae", str(stores.sae)]
    result = invoke(*args, *extra)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1 and message in result.output
    assert not out.exists()


def test_explore_refuses_another_host_without_a_token(index: Path) -> None:
    result = invoke("explore", str(index), "--host", "0.0.0.0")
    assert result.exit_code == 2 and result.output.startswith("Error: --host 0.0.0.0 would let other machines")
    assert result.output.count("\n") == 1


def test_a_live_model_that_does_not_fit_the_sae_is_one_error(index: Path, llama: Path) -> None:
    """The planted SAE reads 4 layers; the tiny Llama has 3 blocks."""
    result = invoke("explore", str(index), "--model", str(llama), "--device", "cpu")
    assert result.exit_code == 2 and result.output.startswith("Error: model ") and result.output.count("\n") == 1
    assert "does not fit the SAE" in result.output and "pass the model the cache was harvested from" in result.output


def test_a_port_in_use_is_one_error(index: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = invoke("explore", str(index), "--port", str(taken.getsockname()[1]))
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1" in result.output and "--port" in result.output


def test_explore_prints_the_url_and_the_ssh_line_and_serves(server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    assert server.url == f"http://127.0.0.1:{port}"
    ssh = next(line for line in server.lines if line.startswith("from your laptop:"))
    assert f"ssh -N -L {port}:localhost:{port} " in ssh and f"http://localhost:{port}/" in ssh
    with urllib.request.urlopen(f"{server.url}/api/v1/meta", timeout=30) as response:
        assert json.load(response)["n_latents"] == N_LATENTS


def test_explore_with_a_token_prints_it_in_the_url(index: Path) -> None:
    running = Server(index, "--token", "a-long-secret")
    try:
        assert running.url.endswith("/?token=a-long-secret")
        base = running.url.split("/?", 1)[0]
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{base}/api/v1/meta", timeout=30)
        with urllib.request.urlopen(f"{base}/api/v1/meta?token=a-long-secret", timeout=30) as response:
            assert response.status == 200
    finally:
        running.stop()
