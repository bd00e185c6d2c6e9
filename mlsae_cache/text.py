"""Load text, tokenise it and cut it into context windows.

Documents come from the embedded `pydoc` corpus (CPython's `pydoc_data.topics`, in sorted topic order), a local
.txt/.jsonl/.json/.parquet file, or a `datasets` hub id. The separator token (EOS, else BOS) goes before every
document, as in the reference setup; the token stream is cut into windows of `context_length` tokens with no
padding (the tail shorter than a window is dropped). Everything is deterministic, so a resumed harvest can
regenerate the windows it skips.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlsae_cache.core.boundary import held_logs, library_cause
from mlsae_cache.core.errors import InputError, NotFoundError

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TOKENIZE_BATCH = 64


@dataclass(frozen=True)
class TextSpec:
    """Where the text comes from; recorded in the cache's `dataset` attribute."""

    dataset: str = "pydoc"
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The fields that determine the text (streaming changes how, not what)."""
        return {"dataset": self.dataset, "config": self.config, "split": self.split, "text_column": self.text_column}


def pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


FORMATS = {"text": "text", "json": "JSON", "parquet": "Parquet"}


def unreadable(spec: TextSpec, e: BaseException) -> InputError:
    """The one-line error for text the datasets library could not read: which source, as what, and why."""
    suffix = Path(spec.dataset).suffix.lower()
    if suffix in LOCAL_BUILDERS:
        what = f"dataset file {spec.dataset} cannot be read as {FORMATS[LOCAL_BUILDERS[suffix]]}"
        fix = "fix or convert the file, or give another --dataset"
    else:
        what = f"dataset {spec.dataset!r} cannot be read"
        fix = "check the id, --dataset-config, --split and --streaming, or give a local file"
    return InputError(f"{what}: {library_cause(e)} ({fix})")


def _local_file(spec: TextSpec) -> Path:
    """The local text file `spec` names, refused with a one-line error when it is missing, a directory, empty or
    of an unsupported kind."""
    path = Path(spec.dataset).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise InputError(
            f"dataset {spec.dataset} is a directory (give one .txt, .jsonl, .json or .parquet file, pydoc, or a hub id)"
        )
    if not path.is_file():
        raise NotFoundError(
            f"dataset file {spec.dataset} does not exist (give a .txt, .jsonl, .json or "
            ".parquet file, pydoc, or a hub id)"
        )
    if suffix not in LOCAL_BUILDERS:
        raise InputError(
            f"dataset file {spec.dataset} has an unsupported suffix {suffix!r} (use one of {', '.join(LOCAL_BUILDERS)})"
        )
    if path.stat().st_size == 0:
        raise InputError(f"dataset file {spec.dataset} is empty (give a file with text in it)")
    return path


def _open_dataset(spec: TextSpec) -> Any:
    import datasets

    path = Path(spec.dataset).expanduser()
    if path.suffix.lower() in LOCAL_BUILDERS or path.exists():
        path = _local_file(spec)
        extra = {"sample_by": "paragraph"} if path.suffix.lower() == ".txt" else {}
        try:
            with held_logs():
                return datasets.load_dataset(
                    LOCAL_BUILDERS[path.suffix.lower()], data_files=str(path), split="train",
                    streaming=spec.streaming, **extra,
                )  # fmt: skip
        except Exception as e:  # whatever the library raises, the file could not be read
            raise unreadable(spec, e) from e
    try:
        return datasets.load_dataset(spec.dataset, spec.config, split=spec.split, streaming=spec.streaming)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NotFoundError(
            f"cannot load dataset {spec.dataset!r}: {first} (check the id, --dataset-config "
            "and --split, or give a local file)"
        ) from e


def _rows(ds: Any, spec: TextSpec) -> Iterator[dict[str, Any]]:
    """The rows of `ds`; an error of the library while reading one (a streamed file is parsed as it is read) is
    a one-line error naming the source."""
    rows = iter(ds)
    while True:
        try:
            with held_logs():
                row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # whatever the library raises, the text could not be read
            raise unreadable(spec, e) from e
        yield row


def _columns(ds: Any, spec: TextSpec) -> list[str] | None:
    try:
        with held_logs():
            names = ds.column_names
    except Exception as e:  # a streamed file's columns are read from its first rows
        raise unreadable(spec, e) from e
    return list(names) if names is not None else None


def load_documents(spec: TextSpec) -> Iterator[str]:
    """The documents of `spec`, in a fixed order; InputError names the missing column and the ones there are."""
    if spec.dataset == "pydoc":
        yield from pydoc_documents()
        return
    ds = _open_dataset(spec)
    columns = _columns(ds, spec)
    if columns is not None and spec.text_column not in columns:
        raise InputError(
            f"dataset {spec.dataset} has no column {spec.text_column!r} (use --text-column with one of {columns})"
        )
    for row in _rows(ds, spec):
        text = row.get(spec.text_column)
        if text is None and spec.text_column not in row:
            raise InputError(
                f"dataset {spec.dataset} has no column {spec.text_column!r} "
                f"(use --text-column with one of {sorted(row)})"
            )
        if text:
            yield str(text)


def separator_id(tokenizer: Any) -> int | None:
    for attr in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def token_stream(documents: Iterable[str], tokenizer: Any) -> Iterator[np.ndarray]:
    """Per document: [separator] + its tokens (no special tokens added by the tokenizer)."""
    sep = separator_id(tokenizer)
    prefix = [sep] if sep is not None else []
    for batch in _batched(documents, TOKENIZE_BATCH):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            yield np.asarray(prefix + list(ids), dtype=np.int64)


def windows(pieces: Iterable[np.ndarray], context_length: int) -> Iterator[np.ndarray]:
    """Cut the concatenated token pieces into consecutive windows of exactly `context_length` tokens."""
    if context_length < 1:
        raise InputError(f"--context-length must be at least 1, got {context_length}")
    pending: list[np.ndarray] = []
    n_pending = 0
    for piece in pieces:
        pending.append(piece)
        n_pending += len(piece)
        if n_pending < context_length:
            continue
        flat = np.concatenate(pending)
        n_full = len(flat) // context_length
        yield from flat[: n_full * context_length].reshape(n_full, context_length)
        rest = flat[n_full * context_length :]
        pending, n_pending = [rest], len(rest)


def window_batches(spec: TextSpec, tokenizer: Any, context_length: int, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of `batch_size` windows [batch, context_length] (the last may be smaller).

    Raises InputError before yielding anything when the text is empty or shorter than one window.
    """
    stream = windows(token_stream(load_documents(spec), tokenizer), context_length)
    batch = []
    n_tokens_seen = 0
    for window in stream:
        batch.append(window)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
        n_tokens_seen += context_length
    if batch:
        yield np.stack(batch)
    if n_tokens_seen == 0:
        raise InputError(
            f"dataset {spec.dataset} (column {spec.text_column!r}) has less text than one window of "
            f"{context_length} tokens (give more text or lower --context-length)"
        )
