"""Progress of long work, the same facts on a terminal and in a log: one bar per command on a terminal (total, rate,
ETA and the command's own facts, e.g. fit's FVU), and off a terminal (nohup, SLURM, CI) one line every
`interval` seconds, then a last one.

Library functions take a `Progress` callback and call it with the units done since the last call and, when they
know them, facts: `total` (units in all), `resumed_at` (units already done by an earlier run: the bar starts
there and says so), and anything to show beside the rate (`fvu=0.31`, `l0=32.0`). Only the CLIs draw.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("mlsae")

CONTROL = ("total", "resumed_at")


class Progress(Protocol):
    """What a long-running library function reports its progress to."""

    def __call__(self, n: int, /, **facts: Any) -> None: ...


def no_progress(n: int, /, **facts: Any) -> None:
    """A Progress that shows nothing."""


def _count(n: float) -> str:
    return f"{n:,.0f}" if n < 1e6 else f"{n / 1e6:,.2f}M"


def duration(seconds: float) -> str:
    """'4m05s', or '2h07m' from an hour on."""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _facts(facts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in facts.items())


class _LogLines:
    """Off a terminal: a line every `interval` seconds with done/total, rate, ETA and the facts, and one at the end."""

    def __init__(self, desc: str, unit: str, total: float | None, interval: float) -> None:
        self.desc, self.total, self.interval = desc, total, interval
        self.unit = unit if unit.endswith("s") else f"{unit}s"
        self.done = self.initial = 0
        self.started = self.last = time.monotonic()
        self.reported = False
        self.emitted = 0
        self.facts: dict[str, Any] = {}

    def __call__(self, n: int, /, **facts: Any) -> None:
        if not self.reported:  # the work starts now: rate and ETA leave out the setup (loading a model)
            self.started = self.last = time.monotonic()
            self.reported = True
        if facts.get("total"):
            self.total = facts["total"]
        if facts.get("resumed_at"):
            self.done = self.initial = int(facts["resumed_at"])
            log.info("%s: resuming at %s %s", self.desc, _count(self.initial), self.unit)
        self.facts.update({k: v for k, v in facts.items() if k not in CONTROL})
        self.done += n
        if n and time.monotonic() - self.last >= self.interval:
            self.emit()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.done - self.initial) / elapsed
        parts = [f"{self.desc}: {_count(self.done)}"]
        if self.total:
            parts[0] += f"/{_count(self.total)} {self.unit} ({self.done / self.total:.0%})"
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = f", ETA {duration(left)}" if left != float("inf") else ""
        else:
            parts[0] += f" {self.unit}"
            eta = ""
        parts.append(f"{_count(rate)} {self.unit}/s{eta}, {duration(elapsed)} elapsed")
        if self.facts:
            parts.append(_facts(self.facts))
        return "; ".join(parts)

    def emit(self) -> None:
        self.last, self.emitted = time.monotonic(), self.done
        log.info("%s", self.line())

    def close(self) -> None:
        if self.done > max(self.initial, self.emitted):  # a last line, unless the last one said it all
            self.emit()


def _unreported_size() -> os.terminal_size | None:
    """None when the terminal reports its size (the bar follows it); else $COLUMNS/$LINES or 80x24 (a terminal
    opened without a size, as some containers and `script` do, reports 0x0, in which tqdm would draw nothing)."""
    try:
        if os.get_terminal_size(sys.stderr.fileno()).columns > 0:
            return None
    except (OSError, ValueError):
        pass
    return shutil.get_terminal_size((80, 24))


class _Bar:
    """On a terminal: a tqdm bar whose total, start and postfix follow the facts. It is drawn from the first report
    on, so what a command prints before its work starts (a plan, a warning) comes before the bar."""

    def __init__(self, desc: str, unit: str, total: float | None) -> None:
        self.desc, self.unit, self.total = desc, unit, total
        self.facts: dict[str, Any] = {}
        self._bar: Any = None

    @property
    def bar(self) -> Any:
        if self._bar is None:
            size = _unreported_size()
            fixed = {} if size is None else {"ncols": size.columns, "nrows": size.lines}
            self._bar = tqdm(
                total=self.total, unit=self.unit, unit_scale=True, desc=self.desc, dynamic_ncols=size is None,
                file=sys.stderr, **fixed,
            )  # fmt: skip
        return self._bar

    def __call__(self, n: int, /, **facts: Any) -> None:
        if facts.get("total"):
            self.total = facts["total"]
            self.bar.total = facts["total"]
        if facts.get("resumed_at"):
            self.bar.initial = self.bar.n = self.bar.last_print_n = int(facts["resumed_at"])
            self.bar.set_description(f"{self.desc} (resumed at {_count(self.bar.n)})", refresh=False)
        shown = {k: v for k, v in facts.items() if k not in CONTROL}
        if shown:  # a fact not given again keeps its last value
            self.facts.update(shown)
            self.bar.set_postfix_str(_facts(self.facts), refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def progress_bar(
    desc: str, unit: str, quiet: bool, total: float | None = None, interval: float = 30.0
) -> Iterator[Progress]:
    """The Progress of one command: a bar on a terminal, log lines off one, nothing with --quiet. While it is shown,
    log records go through it, so they never break into the bar."""
    if quiet:
        yield no_progress
        return
    shown: _Bar | _LogLines = _Bar(desc, unit, total) if sys.stderr.isatty() else _LogLines(desc, unit, total, interval)
    try:
        if isinstance(shown, _Bar):
            with logging_redirect_tqdm():
                yield shown
        else:
            yield shown
    finally:
        shown.close()


class Stages:
    """Progress of a command that works in stages one after another (eval's rows, then its spliced windows): each
    stage's display opens when the stage first reports and closes the one before, so one bar shows at a time."""

    def __init__(self, quiet: bool, interval: float) -> None:
        self.quiet, self.interval = quiet, interval
        self._open: Any = None

    def stage(self, desc: str, unit: str, total: float | None = None) -> Progress:
        shown: list[Progress] = []

        def report(n: int, /, **facts: Any) -> None:
            if not shown:
                self.close()
                self._open = progress_bar(desc, unit, self.quiet, total, self.interval)
                shown.append(self._open.__enter__())
            shown[0](n, **facts)

        return report

    def close(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
