"""Writing an analysis output directory all at once: built in a temporary sibling, then renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlsae_cache.core.errors import StoreError

MARKER = ".mlsae-output"


@contextmanager
def output_dir(out: Path, kind: str) -> Iterator[Path]:
    """Yield a fresh directory to fill; on success it replaces `out` (a previous output of the same kind only).

    On any error the temporary directory is removed and `out` is left as it was.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise StoreError(f"OUT {out} is a file (choose a directory)")
        marker = out / MARKER
        if any(out.iterdir()) and not (marker.is_file() and marker.read_text().strip() == kind):
            raise StoreError(f"OUT {out} is a non-empty directory that is not a {kind} output (choose another OUT)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (tmp / MARKER).write_text(kind + "\n")
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}-old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
