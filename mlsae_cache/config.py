"""Typed, frozen configurations of the cache commands. CLI options map one-to-one onto these fields."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import InputError
from mlsae_cache.storage import STORAGE_DTYPES


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """`all` (or None) -> None; `0,2,5` -> (0, 2, 5); ranges as `0-3,8` -> (0, 1, 2, 3, 8), the form every output
    prints them in."""
    if text is None or text.strip().lower() == "all":
        return None
    layers: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            span = range(int(first), int(last) + 1) if dash else range(int(first), int(first) + 1)
        except ValueError as e:
            raise InputError(
                f"--layers {text!r} is not 'all' or a list of block indices and ranges like 0,2,5 or 0-29"
            ) from e
        if not span:
            raise InputError(f"--layers {text!r}: the range {part.strip()!r} is empty (write low-high, e.g. 0-29)")
        layers.extend(span)
    if len(set(layers)) != len(layers):
        raise InputError(f"--layers {text!r} names a block twice (list each block once)")
    return tuple(layers)


def resolve_layers(layers: tuple[int, ...] | None, n_layers: int) -> tuple[int, ...]:
    """The selected block indices in increasing order, checked against the model's number of blocks."""
    if layers is None:
        return tuple(range(n_layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise InputError(
            f"--layers {','.join(map(str, layers))} names blocks {bad} but the model has blocks "
            f"0..{n_layers - 1} (pick indices in that range)"
        )
    return tuple(sorted(layers))


@dataclass(frozen=True)
class HarvestConfig:
    """Everything `mlsae-cache harvest` takes."""

    out: Path
    model: str = "smollm2-135m"
    gguf_file: str | None = None
    revision: str | None = None
    dataset: str = "pydoc"
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False
    context_length: int = 256
    max_tokens: int | None = None
    batch_windows: int = 8
    layers: tuple[int, ...] | None = None
    dtype: str = "float16"
    compute_dtype: str = "auto"
    device: str = "auto"
    overwrite: bool = False
    chunk_tokens: int = 4096
    model_cache: Path | None = None
    num_shards: int = 1
    shard_index: int = 0
    direct_io: bool = True
    dry_run: bool = False

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a device that cannot be used is refused before any work
        if self.context_length < 1:
            raise InputError(f"--context-length must be at least 1, got {self.context_length}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.batch_windows < 1:
            raise InputError(f"--batch-windows must be at least 1, got {self.batch_windows}")
        if self.chunk_tokens < 1:
            raise InputError(f"--chunk-tokens must be at least 1, got {self.chunk_tokens}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise InputError(
                f"--shard-index {self.shard_index} must be in 0..{self.num_shards - 1} (--num-shards {self.num_shards})"
            )
        if self.num_shards > 1 and self.max_tokens is None:
            raise InputError("--num-shards needs --max-tokens: the shards split a known number of tokens")
        if self.num_shards > 1 and self.overwrite:
            raise InputError(
                "--overwrite cannot be combined with --num-shards: remove OUT first, then start the shards"
            )
        if self.dtype not in STORAGE_DTYPES:
            raise InputError(f"--dtype {self.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
