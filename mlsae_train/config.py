"""Typed, frozen configuration of `mlsae-train fit`. CLI options map one-to-one onto these fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import InputError
from mlsae_train.kernels import DECODER_KERNELS, DecoderKernel

AUTOCAST = ("none", "bf16")
LOSS_SPACES = ("standardized", "raw")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `mlsae-train fit` takes. Hyperparameter defaults are the paper's (docs/METHOD.md section 4).

    `lens`: a tuned lens (`mlsae-train lens`); rows are translated by it before standardisation.

    `seed` seeds the initial weights and, unless `data_seed` is given, the row order (`row_seed`): a sweep
    (sweep.py) trains members of several seeds on one row order, and a member equals the single run with its
    `seed` and the sweep's `data_seed`.

    `decoder_kernel` (kernels.py) chooses how the sparse decoder is computed, not what, and `reuse_buffers` whether
    the loader refills its block buffers (loader.py): like `device` they are left out of `hyperparameters`, so
    cfg.json does not record them and a run may resume with others.
    """

    cache: Path
    out: Path
    expansion_factor: int = 64
    k: int = 32
    batch_rows: int = 4096
    lr: float = 1e-4
    max_rows: int | None = None
    layers: tuple[int, ...] | None = None
    seed: int = 0
    data_seed: int | None = None
    device: str = "auto"
    resume: bool = False
    standardize: bool = True
    dead_after_rows: int = 10_000_000
    k_aux: int = 256
    autocast: str = "none"
    decoder_kernel: DecoderKernel = "auto"
    checkpoint_every_rows: int = 1_000_000
    log_every_steps: int = 10
    block_units: int = 32
    train_tokens: int | None = None
    reuse_buffers: bool = True
    overwrite: bool = False
    loss_space: str = "standardized"
    lens: Path | None = None

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a device that cannot be used is refused before any work
        positive = (
            "expansion_factor",
            "k",
            "batch_rows",
            "dead_after_rows",
            "checkpoint_every_rows",
            "log_every_steps",
            "block_units",
        )
        for name in positive:
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise InputError(f"--max-rows must be at least 1, got {self.max_rows}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.k_aux < 0:
            raise InputError(f"--k-aux must be at least 0, got {self.k_aux}")
        if self.loss_space not in LOSS_SPACES:
            raise InputError(f"--loss-space {self.loss_space!r} is not one of {', '.join(LOSS_SPACES)}")
        if self.autocast not in AUTOCAST:
            raise InputError(f"--autocast {self.autocast!r} is not one of {', '.join(AUTOCAST)}")
        if self.decoder_kernel not in DECODER_KERNELS:
            raise InputError(f"--decoder-kernel {self.decoder_kernel!r} is not one of {', '.join(DECODER_KERNELS)}")

    @property
    def row_seed(self) -> int:
        """The seed of the loader's row order: `data_seed`, or `seed` when it is not given."""
        return self.seed if self.data_seed is None else self.data_seed

    def hyperparameters(self) -> dict[str, Any]:
        """What determines the trained weights (not paths, device, decoder kernel, logging); compared on resume."""
        d = asdict(self)
        how = (
            "device",
            "decoder_kernel",
            "reuse_buffers",
            "resume",
            "overwrite",
            "checkpoint_every_rows",
            "log_every_steps",
        )
        for name in ("cache", "out", "lens", *how):  # the lens is recorded by its fingerprint (trainer.run_record)
            d.pop(name)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["data_seed"] = self.row_seed  # recorded as the seed it is, so `--seed 3` and `--data-seed 3` agree
        return d
