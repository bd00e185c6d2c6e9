"""What every command of the three CLIs shares: options that map one-to-one onto its config, presets given with
--config (checked, and overridden by the command line), --quiet/--debug before or after the command's name, and
--version."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from mlsae_analyze.cli import main as analyze_main
from mlsae_analyze.cosine import CosineConfig
from mlsae_analyze.delphi import DelphiConfig
from mlsae_analyze.encode import EncodeConfig
from mlsae_analyze.examples import ExamplesConfig
from mlsae_analyze.explorer.build import IndexConfig
from mlsae_analyze.explorer.serve import ExploreConfig
from mlsae_analyze.prompt import PromptConfig
from mlsae_analyze.report import HeatmapConfig, ReportConfig
from mlsae_analyze.variance import VarianceConfig
from mlsae_cache.cli import main as cache_main
from mlsae_cache.config import HarvestConfig
from mlsae_cache.core.presets import COMMANDS, preset_defaults
from mlsae_cache.importer import ImportConfig
from mlsae_cache.store import Cache
from mlsae_train.cli import main as train_main
from mlsae_train.compare import CompareConfig
from mlsae_train.config import TrainConfig
from mlsae_train.evaluate import EvalConfig
from mlsae_train.interop.exchange import ExportConfig, ImportSaeConfig
from mlsae_train.interop.push import PushConfig
from mlsae_train.lens_eval import LensEvalConfig
from mlsae_train.lens_import import ImportLensConfig
from mlsae_train.lens_train import LensConfig
from mlsae_train.sweep import SweepConfig

CLIS = {"mlsae-cache": cache_main, "mlsae-train": train_main, "mlsae-analyze": analyze_main}
CONFIGS = {
    "harvest": HarvestConfig,
    "import": ImportConfig,
    "fit": TrainConfig,
    "eval": EvalConfig,
    "compare": CompareConfig,
    "export": ExportConfig,
    "import-sae": ImportSaeConfig,
    "push": PushConfig,
    "lens": LensConfig,
    "eval-lens": LensEvalConfig,
    "import-lens": ImportLensConfig,
    "sweep": SweepConfig,
    "encode": EncodeConfig,
    "variance": VarianceConfig,
    "cosine": CosineConfig,
    "heatmap": HeatmapConfig,
    "prompt-heatmap": PromptConfig,
    "examples": ExamplesConfig,
    "report": ReportConfig,
    "index": IndexConfig,
    "explore": ExploreConfig,
    "export-delphi": DelphiConfig,
}
PATH_ONLY = {"info", "verify", "convert-reference"}  # a path or two in, nothing to configure
COMMON = {"debug", "quiet", "log_interval", "config", "version", "help"}
RENAMED = {"layers_text": "layers"}  # options parsed from text into a config field of another name
PRESETS = sorted((Path(__file__).resolve().parent.parent / "data" / "presets").glob("*.toml"))


def all_commands() -> dict[str, click.Command]:
    return {name: cmd for cli in CLIS.values() for name, cmd in cli.commands.items()}


def test_every_command_is_configured_or_takes_only_paths() -> None:
    assert set(all_commands()) == set(CONFIGS) | PATH_ONLY == COMMANDS


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_options_match_the_config(name: str) -> None:
    params = {RENAMED.get(p.name, p.name) for p in all_commands()[name].params if p.name not in COMMON}
    assert params == {f.name for f in dataclasses.fields(CONFIGS[name])}


@pytest.mark.parametrize("name", sorted(all_commands()))
def test_every_option_has_help_and_every_command_the_common_ones(name: str) -> None:
    command = all_commands()[name]
    options = [p for p in command.params if isinstance(p, click.Option)]
    assert [p.name for p in options if not p.help] == []
    assert COMMON - {"help"} <= {p.name for p in command.params}


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_shipped_presets_are_valid(preset: Path) -> None:
    commands = all_commands()
    import tomllib

    tables = tomllib.loads(preset.read_text())
    assert tables
    for name in tables:
        command = commands[name]
        values = preset_defaults(command, click.Context(command), preset)
        assert values and all(v is not None for v in values.values())


def run(cli: str, *args: str) -> object:
    return CliRunner().invoke(CLIS[cli], list(args))


@pytest.fixture
def npy(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).normal(size=(300, 2, 8)).astype(np.float32))
    return path


def test_a_preset_sets_defaults_and_the_command_line_wins(tmp_path: Path, npy: Path) -> None:
    preset = tmp_path / "p.toml"
    preset.write_text("[import]\nchunk-tokens = 64\ncontext_length = 50\n\n[fit]\nk = 4\n")
    assert (
        run("mlsae-cache", "import", str(tmp_path / "a"), "--activations", str(npy), "--config", str(preset)).exit_code
        == 0
    )
    assert (Cache(tmp_path / "a").chunk_tokens, Cache(tmp_path / "a").meta.context_length) == (64, 50)
    args = ["import", str(tmp_path / "b"), "--config", str(preset), "--activations", str(npy), "--chunk-tokens", "32"]
    assert run("mlsae-cache", *args).exit_code == 0
    assert (Cache(tmp_path / "b").chunk_tokens, Cache(tmp_path / "b").meta.context_length) == (32, 50)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[import]\nchunk_tokenz = 64\n", "[import] has no option 'chunk_tokenz'"),
        ("[import]\nchunk_tokens = 'many'\n", "[import] chunk_tokens = 'many' is invalid"),
        ("[import]\ndtype = 'float64'\n", "[import] dtype = 'float64' is invalid"),
        ("[imports]\nchunk_tokens = 64\n", "[imports] is not a table named after a command"),
        ("chunk_tokens = 64\n", "[chunk_tokens] is not a table named after a command"),
        ("[import\n", "is not a readable TOML file"),
        (None, "does not exist"),
    ],
    ids=["unknown-key", "wrong-type", "wrong-choice", "unknown-table", "no-table", "not-toml", "missing"],
)
def test_a_bad_preset_is_one_line_and_writes_nothing(tmp_path: Path, npy: Path, text: str | None, message: str) -> None:
    preset = tmp_path / "p.toml"
    if text is not None:
        preset.write_text(text)
    result = run("mlsae-cache", "import", str(tmp_path / "out"), "--activations", str(npy), "--config", str(preset))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1 and message in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_and_quiet_are_accepted_before_or_after_the_command(tmp_path: Path, where: str) -> None:
    args = ["info", str(tmp_path / "missing")]
    quiet = ["--quiet", *args] if where == "before" else [*args, "--quiet"]
    result = run("mlsae-cache", *quiet)
    assert result.exit_code == 2 and result.output.startswith("Error: cache") and result.output.count("\n") == 1
    debug = ["--debug", *args] if where == "before" else [*args, "--debug"]
    result = run("mlsae-cache", *debug)
    assert result.exit_code == 1 and isinstance(result.exception, FileNotFoundError)  # raised, with its traceback


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_version_on_every_command(cli: str) -> None:
    from importlib.metadata import version

    for args in (["--version"], [next(iter(CLIS[cli].commands)), "--version"]):
        result = run(cli, *args)
        assert result.exit_code == 0 and version("mlsae") in result.output
