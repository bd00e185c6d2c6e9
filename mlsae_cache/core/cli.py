"""What the three command-line interfaces share: one-line errors and exit codes, --quiet/--debug/--config/--version
on every command, progress bars."""

from __future__ import annotations

import errno
import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import click

from mlsae_cache.core.errors import Interrupted, MlsaeError
from mlsae_cache.core.outputs import disk_full
from mlsae_cache.core.paths import bytes_under, gigabytes
from mlsae_cache.core.progress import duration

F = TypeVar("F", bound=Callable[..., Any])


def one_line(message: str) -> str:
    return " ".join(str(message).split())


INTERRUPTED = "interrupted before anything was written"


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
    except click.UsageError as e:  # a bad option or argument on the command line: one line too
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        _fail(f"{e.format_message()}{hint}", e.exit_code)
    except KeyboardInterrupt as e:
        if debug():
            raise
        _fail(str(e) if isinstance(e, Interrupted) else interrupted, 130)
    except Exception as e:  # a full disk, however the library that met it reports it
        if debug() or not disk_full(e):
            raise
        quota = isinstance(e, OSError) and e.errno == errno.EDQUOT
        what = "the disk quota is used up" if quota else "the disk is full"
        where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
        _fail(f"{what}{where} (free space on that disk, then re-run the same command)", 1)


def handle_errors(func: F) -> F:
    """Kept for commands outside an `MlsaeGroup`: report errors of `func` as MlsaeGroup does."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        return run_reporting_errors(lambda: func(*args, **kwargs), lambda: flags(ctx)["debug"])

    return wrapper  # type: ignore[return-value]


def flags(ctx: click.Context) -> dict[str, Any]:
    """The --quiet, --debug and --log-interval of this invocation (given before or after the command's name)."""
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {"quiet": False, "debug": False, "interval": LOG_INTERVAL_S}
    return root.obj  # type: ignore[no-any-return]


LOG_INTERVAL_S = 30.0
"""Seconds between progress lines off a terminal."""


def done_line(out: Path | str, started: float, next_step: str) -> str:
    """The end of a command's final message: the size of what it wrote, the time since `started` (a
    time.monotonic()), and the command to run next."""
    return f"{gigabytes(bytes_under(out))} in {duration(time.monotonic() - started)}; next: {next_step}"


def progress(ctx: click.Context, desc: str, unit: str, total: float | None = None) -> Any:
    """The command's progress display (core.progress.progress_bar) with this invocation's flags."""
    from mlsae_cache.core.progress import progress_bar

    f = flags(ctx)
    return progress_bar(desc, unit, f["quiet"], total, f["interval"])


def stages(ctx: click.Context) -> Any:
    """Displays for a command that works in stages (core.progress.Stages), with this invocation's flags."""
    from mlsae_cache.core.progress import Stages

    f = flags(ctx)
    return Stages(f["quiet"], f["interval"])


def _set_interval(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
    if value is not None:
        if value <= 0:
            raise click.BadParameter("must be positive", ctx, param)
        flags(ctx)["interval"] = value


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
        click.Option(["--log-interval"], type=float, default=None, expose_value=False, callback=_set_interval,
                     metavar="SECONDS", help=f"Seconds between progress lines off a terminal [{LOG_INTERVAL_S:g}]."),
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
    # off a terminal (a log file) each line says when
    fmt = "%(levelname)s %(name)s: %(message)s" if sys.stderr.isatty() else "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    logging.getLogger().setLevel(level)  # a flag given after the command's name changes it again
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not debug else logging.DEBUG)


def silence_library_progress() -> None:
    """One progress bar per command, ours: switch off those of transformers and datasets."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


class Count(click.ParamType):
    """A count of tokens or rows: `1500000`, `1_500_000`, `1.5e6`, `1.5M`, `64k`, `2G`."""

    name = "count"
    _SUFFIX: ClassVar[dict[str, int]] = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = str(value).strip().replace("_", "").replace(",", "")
        scale = self._SUFFIX.get(text[-1:].lower(), 1) if text else 1
        number = text[:-1] if scale != 1 else text
        try:
            exact = float(number) * scale
        except ValueError:
            self.fail(f"{value!r} is not a count (write e.g. 100000, 1e5, 100k or 1.5M)", param, ctx)
        if exact != int(exact):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        return int(exact)


COUNT = Count()


class Values(click.ParamType):
    """One or more numbers, comma-separated (`16,32`); a preset gives them as a TOML list (`k = [16, 32]`)."""

    def __init__(self, kind: type[int] | type[float]) -> None:
        self.kind, self.name = kind, f"{kind.__name__}s"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return value
        texts = [str(value)] if isinstance(value, int | float) else str(value).split(",")
        if not all(t.strip() for t in texts):
            self.fail(f"{value!r} lists no value or an empty one (give one or more, e.g. 16,32)", param, ctx)
        try:
            return tuple(self.kind(t.strip()) for t in texts)
        except ValueError:
            self.fail(f"{value!r} is not a list of {self.kind.__name__} values (write e.g. 16,32)", param, ctx)
