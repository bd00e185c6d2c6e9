"""Training a tuned lens from a cache (`mlsae-train lens`; docs/METHOD.md, "The tuned lens").

For every stored block l one affine translator T_l(h) = h + A_l h + b_l (A_l, b_l start at 0) is trained so that
the model's final norm and LM head applied to T_l(h_l) match the model's own final distribution p_final, computed
from the last stored block (the model's last): minimise the mean over training tokens of KL(p_final || p_l). The
model is never re-run. All translators train together, each on its own layer's KL (Adam).

Internally A_l and b_l are trained in the units of layer l's root-mean-square entry s_l (from the cache's
statistics): T_l(h) = h + A'_l (h / s_l) + s_l b'_l, so one learning rate suits layers whose norms differ a
hundredfold; the lens file holds A_l = A'_l / s_l and b_l = s_l b'_l.

Data: the trainable tokens before `train_tokens` (the rest is held out for `eval-lens`), in an order that follows
from the seed alone: each epoch puts the cache's token chunks in a random order, takes them `block_chunks` at a
time, and cuts each block's tokens, randomly permuted, into batches. The step count is the whole cursor, so a run
killed at any moment continues from its last checkpoint to the same translators as an uninterrupted run.
Memory: one block of float32 rows (block_chunks x chunk_tokens x n_layers x d_model) and, per pass of the head,
`chunk_rows` x vocabulary logits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import InputError, Interrupted
from mlsae_cache.core.lock import StoreLock
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.store import Cache, open_cache
from mlsae_train.lens import CFG_NAME, Lens, read_lens_cfg, save_lens
from mlsae_train.lens_head import AUTOCASTS, LensHead, kl_to_final, load_head
from mlsae_train.outdir import clear_out
from mlsae_train.state import load_state, save_state, state_exists

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LensConfig:
    """Everything `mlsae-train lens` takes; CLI options map one-to-one onto these fields.

    max_tokens: tokens to train on in all (None: `epochs` passes over the training tokens); train_tokens: train on
    tokens [0, train_tokens) only; chunk_rows: (token, layer) rows per pass of the head (bounds the memory of the
    [rows, vocab] logits); block_chunks: cache chunks whose tokens are shuffled together.
    """

    cache: Path
    out: Path
    model: str | None = None
    epochs: int = 8
    max_tokens: int | None = None
    batch_tokens: int = 512
    lr: float = 1e-2
    train_tokens: int | None = None
    block_chunks: int = 2
    chunk_rows: int = 2048
    seed: int = 0
    device: str = "auto"
    autocast: str = "auto"
    checkpoint_every_steps: int = 20
    overwrite: bool = False

    def __post_init__(self) -> None:
        resolve_device(self.device)
        for name in ("epochs", "batch_tokens", "block_chunks", "chunk_rows", "checkpoint_every_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_tokens", "train_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.autocast not in AUTOCASTS:
            raise InputError(f"--autocast {self.autocast!r} is not one of {', '.join(AUTOCASTS)}")

    def hyperparameters(self) -> dict[str, Any]:
        """What determines the translators (compared when a run continues)."""
        d = asdict(self)
        for name in ("cache", "out", "model", "device", "overwrite", "checkpoint_every_steps", "chunk_rows"):
            d.pop(name)
        return d


@dataclass(frozen=True)
class LensFitResult:
    """Where the lens is, the steps and tokens trained, the last batch's KL per layer, and whether there was
    nothing left to do."""

    out: Path
    steps: int
    tokens: int
    kl: list[float]
    noop: bool = False


class Translators(nn.Module):
    """The trained parameters: A'_l [L, d, d] and b'_l [L, d] in units of the layers' RMS entries `scale` [L]."""

    scale: Tensor

    def __init__(self, scale: Tensor, d_model: int) -> None:
        super().__init__()
        n = scale.shape[0]
        self.register_buffer("scale", scale.float())
        self.weight = nn.Parameter(torch.zeros(n, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n, d_model))

    def forward(self, h: Tensor) -> Tensor:
        """T_l(h) for h [B, L, d] (float32): [B, L, d]."""
        s = self.scale[:, None]
        return h + torch.einsum("bld,lkd->blk", h / s, self.weight) + self.bias * s

    def lens(self, layers: tuple[int, ...], meta: dict[str, Any] | None = None) -> Lens:
        s = self.scale[:, None]
        return Lens(layers, (self.weight / s[..., None]).detach().cpu(), (self.bias * s).detach().cpu(), meta)


def layer_scale(cache: Cache) -> Tensor:
    """Each stored layer's root-mean-square entry over trainable tokens: [L] (1 where the cache has no rows)."""
    rms = np.sqrt(np.asarray(cache.layer_sq_norm(), dtype=np.float64) / cache.d_model)
    return torch.from_numpy(np.where(np.isfinite(rms) & (rms > 0), rms, 1.0))


class TokenSchedule:
    """The batches of training tokens, in an order that follows from the seed (module docstring)."""

    def __init__(self, cache: Cache, cfg: LensConfig) -> None:
        trainable = cache.trainable().copy()
        if cfg.train_tokens is not None:
            if cfg.train_tokens > cache.n_tokens:
                raise InputError(f"--train-tokens {cfg.train_tokens} is more than the cache's {cache.n_tokens} tokens")
            trainable[cfg.train_tokens :] = False
        self.cache, self.cfg, self.trainable = cache, cfg, trainable
        self.n_train = int(trainable.sum())
        if self.n_train == 0:
            raise InputError(f"cache {cache.path} has no trainable token to train a lens on (harvest more text)")

    def _blocks(self, epoch: int) -> Iterator[tuple[int, np.ndarray]]:
        """(block number, its training tokens in their random order) of one epoch."""
        ct, cfg = self.cache.chunk_tokens, self.cfg
        order = np.random.default_rng([cfg.seed, epoch]).permutation(self.cache.n_chunks)
        for i in range(0, len(order), cfg.block_chunks):
            chunks = np.sort(order[i : i + cfg.block_chunks])
            tokens = np.concatenate([np.flatnonzero(self.trainable[c * ct : (c + 1) * ct]) + c * ct for c in chunks])
            yield i, tokens[np.random.default_rng([cfg.seed, epoch, i]).permutation(len(tokens))]

    def batches(self, start_step: int) -> Iterator[Tensor]:
        """Endless float32 batches [B, L, d] (B <= batch_tokens: a block's last batch may be short) from step
        `start_step` on; blocks before it are planned but not read."""
        step, epoch, b = 0, 0, self.cfg.batch_tokens
        while True:
            for _, tokens in self._blocks(epoch):
                n_batches = -(-len(tokens) // b)
                if step + n_batches <= start_step:
                    step += n_batches
                    continue
                rows = self._read(tokens)
                for j in range(n_batches):
                    if step >= start_step:
                        yield torch.from_numpy(rows[np.sort(tokens[j * b : (j + 1) * b])])
                    step += 1
            epoch += 1

    def _read(self, tokens: np.ndarray) -> _ChunkRows:
        """All layers of the chunks holding `tokens`, as an array indexable by cache token."""
        ct = self.cache.chunk_tokens
        return _ChunkRows({int(c): self.cache.activations(c * ct, (c + 1) * ct) for c in np.unique(tokens // ct)}, ct)


class _ChunkRows:
    """rows[tokens] over a few chunks' float32 activations [n, L, d], each keyed by chunk."""

    def __init__(self, chunks: dict[int, np.ndarray], chunk_tokens: int) -> None:
        self.chunks, self.ct = chunks, chunk_tokens

    def __getitem__(self, tokens: np.ndarray) -> np.ndarray:
        return np.stack([self.chunks[int(t) // self.ct][int(t) % self.ct] for t in tokens])


def lens_step(translators: Translators, head: LensHead, h: Tensor, chunk_rows: int) -> Tensor:
    """Accumulate the gradient of sum_l mean_tokens KL(p_final || p_l) for one batch h [B, L, d]; returns the
    batch's mean KL per layer [L] (detached).

    The last layer's translator is not trained: the identity is exactly optimal there (its KL is 0), so its
    gradient is only rounding noise, which Adam, normalising each step, would turn into steps of size lr."""
    n_tokens, n_layers, d = h.shape
    with torch.no_grad():
        target = head.log_probs(h[:, -1])  # [B, V]: the model's own final distribution
    per_layer = torch.zeros(n_layers, device=h.device)
    trained = n_layers - 1
    step = max(1, chunk_rows // max(trained, 1))
    for a in range(0, n_tokens if trained else 0, step):
        part = h[a : a + step]
        y = translators(part)[:, :trained].reshape(-1, d)
        t = target[a : a + step, None].expand(-1, trained, -1).reshape(len(y), -1)
        kl = kl_to_final(head, t, y).view(len(part), trained)
        (kl.sum() / n_tokens).backward()
        per_layer[:trained] += kl.detach().sum(0)
    return per_layer / n_tokens


@dataclass
class _Run:
    """Everything a lens training run mutates, and where it stands."""

    cfg: LensConfig
    schedule: TokenSchedule
    head: LensHead
    translators: Translators
    optimizer: torch.optim.Adam
    layers: tuple[int, ...]
    record: dict[str, Any]
    target: int
    step: int = 0
    tokens: int = 0
    saved_step: int = 0


def lens_record(cfg: LensConfig, cache: Cache, head: LensHead) -> dict[str, Any]:
    """What the lens's cfg.json records beside its tensors, and what a continued run must match."""
    return {
        **cfg.hyperparameters(),
        "cache_fingerprint": cache.meta.fingerprint,
        "cache_path": str(cfg.cache),
        "model": cache.meta.model,
        "head_model": head.name,
        "head_fingerprint": head.fingerprint,
    }


NOT_COMPARED = ("cache_path", "head_model", "epochs", "max_tokens")
"""Record keys that may change when a run continues (train longer; the cache is known by its fingerprint)."""


def plan_lens_out(cfg: LensConfig, record: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """(the saved state to continue from or None, whether OUT must first be emptied); reads only."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT {out} is a file (choose a directory for the lens)")
    if not out.is_dir() or not any(out.iterdir()):
        return None, False
    if cfg.overwrite:
        return None, True
    if not state_exists(out):
        if (out / CFG_NAME).is_file():
            read_lens_cfg(out)  # a lens without its training state: say so precisely below
        raise InputError(
            f"OUT {out} is not empty and holds no lens training run; choose a new directory or pass --overwrite"
        )
    state = load_state(out)
    saved = state["record"]
    diffs = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in record.items() if k not in NOT_COMPARED and saved.get(k) != v]
    if diffs:
        raise InputError(
            f"OUT {out} holds a lens trained with other settings or on another model or cache ({'; '.join(diffs)}); "
            "pass --overwrite to replace it, or choose another OUT"
        )
    return state, False


def prepare_lens(cfg: LensConfig) -> tuple[_Run, bool]:
    """The run, fresh or continued from OUT's state, and whether OUT must be emptied first. Writes nothing."""
    cache = open_cache(cfg.cache)
    device = resolve_device(cfg.device)
    schedule = TokenSchedule(cache, cfg)
    head = load_head(cache, cfg.model, device, cfg.autocast)
    record = lens_record(cfg, cache, head)
    state, clear = plan_lens_out(cfg, record)
    translators = Translators(layer_scale(cache), cache.d_model).to(device)
    optimizer = torch.optim.Adam(translators.parameters(), lr=cfg.lr)
    target = cfg.max_tokens or cfg.epochs * schedule.n_train
    run = _Run(cfg, schedule, head.to(device), translators, optimizer, cache.layers, record, target)
    if state is not None:
        translators.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        run.step = run.saved_step = state["step"]
        run.tokens = state["tokens"]
    return run, clear


def checkpoint_lens(run: _Run) -> None:
    """Training state first, then the lens (marked finished once the run reached its target)."""
    out = Path(run.cfg.out)
    state = {"step": run.step, "tokens": run.tokens, "record": run.record}
    save_state(out, {**state, "model": run.translators.state_dict(), "optimizer": run.optimizer.state_dict()})
    info = {**run.record, "steps": run.step, "tokens_trained": run.tokens, "finished": run.tokens >= run.target}
    save_lens(run.translators.lens(run.layers), out, info)
    run.saved_step = run.step


def _train(run: _Run, progress: Progress) -> list[float]:
    """Steps until the target tokens, checkpointing at intervals; returns the last batch's KL per layer."""
    device, kl = run.translators.scale.device, []
    for h in run.schedule.batches(run.step):
        if run.tokens >= run.target:
            break
        per_layer = lens_step(run.translators, run.head, h.to(device), run.cfg.chunk_rows)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step, run.tokens = run.step + 1, run.tokens + len(h)
        kl = per_layer.tolist()  # a CPU-GPU sync point, once a step
        if run.step % run.cfg.checkpoint_every_steps == 0:
            checkpoint_lens(run)
        progress(len(h), kl=sum(kl) / len(kl))
    return kl


def run_lens(cfg: LensConfig, progress: Progress = no_progress) -> LensFitResult:
    """Train (or continue) the lens of cfg.cache into cfg.out. `progress` gets the tokens of each step and the
    mean KL over layers; Ctrl-C saves a checkpoint and raises `Interrupted` saying how to continue."""
    run, clear = prepare_lens(cfg)
    out = Path(cfg.out)
    if run.step and run.tokens >= run.target:
        return LensFitResult(out, run.step, run.tokens, [], noop=True)
    out.mkdir(parents=True, exist_ok=True)
    with StoreLock(out):
        if clear:
            clear_out(out)
        progress(0, total=run.target, resumed_at=run.tokens)
        try:
            kl = _train(run, progress)
        except KeyboardInterrupt:
            if run.step != run.saved_step:
                checkpoint_lens(run)
            raise Interrupted(
                f"interrupted at {run.tokens:,} of {run.target:,} tokens; the lens of step {run.step} is saved in "
                f"{out}: re-run the same command to continue"
            ) from None
        checkpoint_lens(run)
    if not all(map(math.isfinite, kl)):
        log.warning("the lens's KL is not finite; try a lower --lr")
    return LensFitResult(out, run.step, run.tokens, kl)
