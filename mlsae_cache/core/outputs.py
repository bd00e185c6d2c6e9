"""Output directories written all at once (built in a temporary sibling, then renamed into place), each marked with
what made it, so that a re-run replaces its own earlier output and nothing else without `--overwrite`; and file
modes that follow the umask, so colleagues can read what a command wrote."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlsae_cache.core.errors import MlsaeError, StoreError

MARKER = ".mlsae-output"

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
"""The errnos of a write refused for want of space (a full disk, or the user's quota reached)."""

_FULL_DISK_TEXT = tuple(f"(os error {n})" for n in FULL_DISK)
"""How a Rust library (safetensors) writes those errnos in its error's message."""


def disk_full(e: BaseException) -> bool:
    """Whether `e` comes from a full disk: an OSError of FULL_DISK, one that `e` was raised from (torch.save
    raises a RuntimeError from the OSError of the file it writes), or a Rust library's error naming one."""
    for _ in range(10):
        if isinstance(e, OSError) and e.errno in FULL_DISK:
            return True
        if any(text in str(e) for text in _FULL_DISK_TEXT):
            return True
        inner = e.__cause__ or e.__context__
        if inner is None:
            return False
        e = inner
    return False


def full_disk_error(e: BaseException, where: Path | str) -> OSError | None:
    """For an exception `e` from a full disk (`disk_full`), the OSError that says so naming `where` (the output
    the user gave), which the CLIs show as one line (core.cli); None for any other exception, and for our own
    errors (they say what happened)."""
    if isinstance(e, MlsaeError) or not disk_full(e):
        return None
    code = e.errno if isinstance(e, OSError) and e.errno in FULL_DISK else errno.ENOSPC
    return OSError(code, os.strerror(code), str(where))


@contextmanager
def writing(where: Path | str) -> Iterator[None]:
    """Run a block that writes the output `where`: a full disk met inside it, however the library reports it,
    leaves as OSError(ENOSPC) naming `where`."""
    try:
        yield
    except Exception as e:
        full = full_disk_error(e, where)
        if full is None:
            raise
        raise full from e


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: Path, directory: bool = False) -> None:
    """Give `path` the mode a plain create would have (tempfile and some libraries create 0600 files and 0700
    directories whatever the umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def replace_file(final: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path) beside `final`, give it the umask's mode, fsync it, then rename it over `final`; the
    temp file never survives."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with writing(final):
            write(tmp)
            follow_umask(tmp)  # safetensors creates its files 0600
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _marked(out: Path) -> dict[str, Any] | None:
    """The marker of an output directory (None when there is none): {"kind", "inputs"}; an old marker holds the
    kind alone."""
    marker = out / MARKER
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    try:
        data = json.loads(text)
    except ValueError:
        return {"kind": text, "inputs": None}
    return data if isinstance(data, dict) else None


def check_replaceable(out: Path, kind: str, inputs: dict[str, Any], overwrite: bool) -> None:
    """Refuse to replace anything at `out` but a `kind` output of the same inputs, unless `overwrite`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise StoreError(f"OUT {out} is a file (choose a directory)")
    if not any(out.iterdir()) or overwrite:
        return
    old = _marked(out)
    if old is None or old.get("kind") != kind:
        raise StoreError(f"OUT {out} is a non-empty directory that is not a {kind} output (choose another OUT)")
    if old.get("inputs") not in (None, inputs):
        changed = sorted(k for k in {*inputs, *old["inputs"]} if inputs.get(k) != old["inputs"].get(k))
        raise StoreError(
            f"OUT {out} holds a {kind} output made from other inputs ({', '.join(changed)} differ); pass --overwrite "
            "to replace it, or choose another OUT"
        )


@contextmanager
def output_dir(out: Path, kind: str, inputs: dict[str, Any] | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh directory to fill; on success it replaces `out`. `out` may hold an earlier `kind` output made
    from the same `inputs` (a re-run, perhaps with other options), or anything with `overwrite`; otherwise the call
    is refused before any work. `inputs` names the stores an output is made from (fingerprints or resolved paths),
    not its options: a different SAE's results are never replaced by mistake, other settings are.

    On any error the temporary directory is removed and `out` is left as it was (a full disk: OSError naming
    `out`).
    """
    out = Path(out)
    inputs = inputs or {}
    check_replaceable(out, kind, inputs, overwrite)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            follow_umask(tmp, directory=True)
            (tmp / MARKER).write_text(json.dumps({"kind": kind, "inputs": inputs}, sort_keys=True) + "\n")
            yield tmp
            if out.exists():
                old = out.with_name(f".{out.name}-old")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
