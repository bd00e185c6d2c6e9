"""What the three command-line interfaces share: one-line errors, exit codes, --debug, progress bars."""

from __future__ import annotations

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


def handle_errors(func: F) -> F:
    """Turn MlsaeError, Ctrl-C and a full disk into one `Error: ...` line on stderr with an exit code (2 or 1 as
    the error says, 130 for Ctrl-C); --debug re-raises."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return func(*args, **kwargs)
        except MlsaeError as e:
            if debug:
                raise
            click.echo(f"Error: {one_line(str(e))}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("Error: interrupted (committed work is kept: re-run the same command to resume)", err=True)
            sys.exit(130)
        except OSError as e:
            if debug or e.errno != 28:
                raise
            click.echo(
                f"Error: the disk is full ({e.filename or ''}); free space and re-run the same command to resume",
                err=True,
            )
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def mlsae_group(func: Callable[[], None]) -> click.Group:
    """Make `func` (its docstring is the help) a click group with the options every mlsae CLI shares."""

    @click.group(name=func.__name__, help=func.__doc__)
    @click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
    @click.option("--quiet", is_flag=True, help="No progress bars or info logs.")
    @click.pass_context
    def group(ctx: click.Context, debug: bool, quiet: bool) -> None:
        setup_logging(debug, quiet)
        ctx.obj = {"quiet": quiet}

    return group


def setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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
