"""Where we call a library (datasets, transformers, zarr, safetensors) on something the user gave: its exception
becomes one of our one-line errors naming what the user gave, and the log lines it wrote before failing are kept
back (they are shown when the call succeeds, and always with --debug)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from mlsae_cache.core.errors import InputError, MlsaeError

LIBRARY_LOGGERS = ("datasets", "transformers", "zarr", "safetensors", "huggingface_hub")


def library_cause(e: BaseException) -> str:
    """`Type: first line` of the innermost exception that `e` was raised from (a library wraps the real reason,
    such as a UnicodeDecodeError, in a generic one)."""
    for _ in range(10):
        inner = e.__cause__ or e.__context__
        if inner is None:
            break
        e = inner
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def held_logs(names: tuple[str, ...] = LIBRARY_LOGGERS) -> Iterator[None]:
    """Hold the records the loggers `names` write inside the block: replayed if it succeeds, dropped if it raises
    (our error says why in one line). With debug logging nothing is held."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    held = _Held()
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [held], False

    def restore() -> None:
        for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate

    try:
        yield
    except BaseException:
        restore()
        raise
    restore()
    for record in held.records:
        logging.getLogger(record.name).handle(record)


@contextmanager
def library_call(what: str, fix: str, error: type[MlsaeError] = InputError) -> Iterator[None]:
    """Run a library call on what the user gave: any exception of the library (not ours) becomes
    `error("<what>: <the library's reason> (<fix>)")`, chained to the original for --debug."""
    try:
        with held_logs():
            yield
    except MlsaeError:
        raise
    except Exception as e:  # whatever the library raises, it could not read what it was given
        raise error(f"{what}: {library_cause(e)} ({fix})") from e
