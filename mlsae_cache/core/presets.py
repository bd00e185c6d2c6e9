"""Presets: small TOML files of option values that every command accepts with `--config FILE`.

A preset holds one table per command, named as the command is (`[harvest]`, `[fit]`, `[eval]`, `[variance]`, ...),
so one file can carry the settings of a whole pipeline; each command reads its own table. Keys are the options'
long names, with `-` or `_` (`max_tokens`, `max-tokens`); values are TOML values of the option's type (a list for
a repeatable option; `layers` also takes a list of block indices). Options given on the command line win over the
preset. A table for a command no CLI has, an unknown key, or a value of the wrong type is a one-line error naming
the file, the table and the key. Relative paths in a preset are taken from the directory the command runs in.

The presets the project ships are in `data/presets/`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click

from mlsae_cache.core.errors import InputError, NotFoundError

COMMANDS = frozenset(
    {
        # mlsae-cache
        "harvest", "import", "info", "verify",
        # mlsae-train
        "fit", "eval", "compare", "convert-reference", "export", "import-sae", "push", "lens", "eval-lens",
        "import-lens", "sweep",
        # mlsae-analyze
        "encode", "variance", "cosine", "heatmap", "prompt-heatmap", "examples", "report", "index", "explore",
        "export-delphi",
    }
)  # fmt: skip
"""Every command of the three CLIs (a preset's tables must name one of them; a test keeps the list true)."""


def read_preset(path: Path) -> dict[str, dict[str, Any]]:
    """The tables of the preset at `path`, checked to name known commands."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise NotFoundError(f"--config {path} does not exist (give a TOML preset, e.g. data/presets/demo.toml)") from e
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"--config {path} is not a readable TOML file ({e})") from e
    for name, table in data.items():
        if name not in COMMANDS or not isinstance(table, dict):
            raise InputError(
                f"--config {path}: [{name}] is not a table named after a command (use tables such as [harvest], "
                "[fit], [variance])"
            )
    return data


def _param_for(command: click.Command, key: str) -> click.Parameter | None:
    """The option that `key` names: its parameter name, or one of its long flags, with `-` or `_`."""
    wanted = key.replace("-", "_")
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        names = {param.name or ""} | {flag.lstrip("-").replace("-", "_") for flag in param.opts + param.secondary_opts}
        if wanted in names:
            return param
    return None


def _value(param: click.Parameter, key: str, value: Any) -> Any:
    """A TOML value as the option's value (lists of block indices joined for `layers`; no-flags inverted)."""
    if isinstance(param, click.Option) and param.is_flag and key.replace("-", "_").startswith("no_"):
        if not isinstance(value, bool):
            raise InputError(f"{key} must be true or false, got {value!r}")
        return not value
    if isinstance(value, list) and not param.multiple:
        return ",".join(map(str, value))
    return value


def preset_defaults(command: click.Command, ctx: click.Context, path: Path) -> dict[str, Any]:
    """The parameter values the preset at `path` gives `command`, converted and checked."""
    table = read_preset(path).get(command.name or "", {})
    defaults: dict[str, Any] = {}
    for key, raw in table.items():
        param = _param_for(command, key)
        if param is None or param.name in (None, "config"):
            options = sorted(p.opts[-1] for p in command.params if isinstance(p, click.Option) and p.name != "config")
            raise InputError(f"--config {path}: [{command.name}] has no option {key!r} (options: {', '.join(options)})")
        try:
            value = param.type_cast_value(ctx, _value(param, key, raw))
        except click.BadParameter as e:
            raise InputError(f"--config {path}: [{command.name}] {key} = {raw!r} is invalid ({e.message})") from e
        defaults[param.name] = value  # type: ignore[index]
    return defaults


def _apply(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    if value is None:
        return
    ctx.default_map = {**(ctx.default_map or {}), **preset_defaults(ctx.command, ctx, value)}


def config_option() -> click.Option:
    """The `--config FILE` option, processed before every other so that the preset's values become defaults."""
    return click.Option(
        ["--config"],
        type=click.Path(path_type=Path, dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_apply,
        help="A TOML preset (e.g. data/presets/demo.toml); options on the command line win.",
    )
