"""What the three command-line interfaces share: one-line errors and exit codes, --quiet/--debug/--config/--version
on every command, progress bars."""

from __future__ import annotations

import errno
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from tqdm import tqdm

from mlsae_cache.core.errors import MlsaeError

F = TypeVar("F", bound=Callable[..., Any])


def one_line(message: str) -> str:
    return " ".join(str(message).split())


INTERRUPTED = "interrupted (committed work is kept: re-run the same command to resume)"


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {one_line(message)}", err=True)
    sys.exit(code)


def run_reporting_errors(call: Callable[[], Any], debug: Callable[[], bool], interrupted: str = INTERRUPTED) -> Any:
    """Run `call`, turning MlsaeError, Ctrl-C and a full disk into one `Error: ...` line on stderr with an exit
    code (2 or 1 as the error says, 130 for Ctrl-C); when `debug()` (asked once the error happened), re-raise."""
    try:
        return call()
    except MlsaeError as e:
        if debug():
            raise
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        if debug():
            raise
        _fail(interrupted, 130)
    except OSError as e:
        if debug() or e.errno != errno.ENOSPC:
            raise
        where = e.filename or "while writing"
        _fail(f"the disk is full ({where}); free space and re-run the same command to resume", 1)


def handle_errors(func: F) -> F:
    """Kept for commands outside an `MlsaeGroup`: report errors of `func` as MlsaeGroup does."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        return run_reporting_errors(lambda: func(*args, **kwargs), lambda: flags(ctx)["debug"])

    return wrapper  # type: ignore[return-value]


def flags(ctx: click.Context) -> dict[str, bool]:
    """The --quiet and --debug flags of this invocation (given before or after the command's name)."""
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {"quiet": False, "debug": False}
    return root.obj  # type: ignore[no-any-return]


def _set_flag(name: str) -> Callable[[click.Context, click.Parameter, bool], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            flags(ctx)[name] = True
            setup_logging(flags(ctx)["debug"], flags(ctx)["quiet"])

    return callback


def _common_options() -> list[click.Option]:
    """--quiet, --debug (accepted before or after the command's name) and --config."""
    from mlsae_cache.core.presets import config_option

    return [
        click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_flag("debug"),
                     help="Show tracebacks and debug logs."),
        click.Option(["--quiet"], is_flag=True, expose_value=False, callback=_set_flag("quiet"),
                     help="No progress bars or info logs."),
        config_option(),
    ]  # fmt: skip


class MlsaeGroup(click.Group):
    """A click group whose commands share --quiet, --debug, --config and --version, and whose errors (bad options
    and presets included) are one `Error: ...` line with an exit code."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(_common_options())
        click.version_option(package_name="mlsae")(cmd)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        return run_reporting_errors(lambda: super(MlsaeGroup, self).invoke(ctx), lambda: flags(ctx)["debug"])


def mlsae_group(func: Callable[[], None]) -> click.Group:
    """Make `func` (its docstring is the help) a click group with the options every mlsae CLI shares."""

    @click.group(name=func.__name__, help=func.__doc__, cls=MlsaeGroup)
    @click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
    @click.option("--quiet", is_flag=True, help="No progress bars or info logs.")
    @click.version_option(package_name="mlsae")
    @click.pass_context
    def group(ctx: click.Context, debug: bool, quiet: bool) -> None:
        flags(ctx).update(quiet=quiet or flags(ctx)["quiet"], debug=debug or flags(ctx)["debug"])
        setup_logging(flags(ctx)["debug"], flags(ctx)["quiet"])

    return group


def setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)  # a flag given after the command's name changes it again
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not debug else logging.DEBUG)


def silence_library_progress() -> None:
    """One progress bar per command, ours: switch off those of transformers and datasets."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def show_progress(quiet: bool) -> bool:
    """Progress bars only on a terminal, and never with --quiet."""
    return not quiet and sys.stderr.isatty()


@contextmanager
def progress_bar(
    total: float | None, unit: str, quiet: bool, desc: str, bytes_per_unit: float = 0.0
) -> Iterator[Callable[[int], None]]:
    """A callback advancing a tqdm bar (rate, ETA, and MB/s when bytes_per_unit is given)."""
    bar = tqdm(
        total=total,
        unit=unit,
        unit_scale=True,
        desc=desc,
        disable=not show_progress(quiet),
        dynamic_ncols=True,
        file=sys.stderr,
    )

    def advance(n: int) -> None:
        bar.update(n)
        if bytes_per_unit and bar.format_dict.get("rate"):
            bar.set_postfix_str(f"{bar.format_dict['rate'] * bytes_per_unit / 1e6:.1f} MB/s", refresh=False)

    try:
        yield advance
    finally:
        bar.close()
