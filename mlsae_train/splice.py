"""Delta cross-entropy and KL by splicing an SAE into the model (docs/METHOD.md section 5).

For each SAE layer l, the model runs on held-out context windows with the residual stream after block l
replaced by the SAE's reconstruction x^ = sae(x).x_hat (a forward hook on block l that returns the replaced
output, a tensor or a tuple like the block's own; for an SAE fitted on lens-translated rows, the reconstruction
mapped back through the lens's exact inverse, x^ = T_l^-1(sae(T_l(x)).x_hat)), and the forward pass then
finishes as usual: the remaining blocks, the final norm, the LM head. Per layer, over the evaluated predictions i:

    clean_ce   = mean_i -log p_clean(y_i)
    delta_ce   = mean_i [-log p_spliced(y_i) + log p_clean(y_i)]                    (nats per token)
    kl_clean_spliced = mean_i sum_v p_clean(v) [log p_clean(v) - log p_spliced(v)]  (nats per token; also `kl`)
    kl_spliced_clean = mean_i sum_v p_spliced(v) [log p_spliced(v) - log p_clean(v)] (nats per token)

where prediction i is made at window position t from the input tokens up to t, and y_i is the token at t + 1.
Both KL directions are averaged over tokens, never summed over a sequence (the reference code sums its KL, which
is KL(p_spliced || p_clean), over the sequence).

Special tokens and position 0 follow the cache's trainable policy, in one rule used for both where to splice
and what to average. The SAE was trained only on trainable rows (by default: not a special token such as the
EOS/BOS separator, and not position 0, whose "attention sink" values are far outside the training
distribution), so it is spliced in only at trainable positions: at the others the block's original output is
kept, as if those rows bypassed the SAE. The averages run over the predictions made at spliced positions (the
input token at t is trainable and t is not the last position of its window). Predictions made at an untouched
position are left out: position 0 cannot see any spliced row, so counting it would only dilute the averages.
The clean pass of a batch is computed once and reused for every spliced layer; only the log-probabilities
of the evaluated predictions are kept, one batch at a time.

Windows come either from a token range of the cache (whole windows only, rebuilt from `token_ids`, `sequence`
and `position`; trainable from the stored `trainable` array), or fresh text cut into windows exactly as the
harvest does, with trainable computed by the cache's recorded policy. Which windows are held out is the
caller's choice: a token range past the rows the SAE was trained on, or other text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from mlsae_cache.core.errors import InputError
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.hooks import block_output, with_stream
from mlsae_cache.models import LoadedModel, find_blocks, load_cache_model
from mlsae_cache.policy import TrainablePolicy
from mlsae_cache.store import Cache
from mlsae_cache.text import TextSpec, window_batches
from mlsae_train.lens import Lens
from mlsae_train.results import SpliceMetrics
from mlsae_train.sae import TopKSAE

log = logging.getLogger(__name__)

SAE_BATCH_ROWS = 4096
"""Rows per SAE call inside the splice hook: bounds its [rows, n_latents] pre-activations."""


@dataclass(frozen=True)
class SpliceConfig:
    """What to splice over. CLI options of `mlsae-train eval --splice` map one-to-one onto these fields.

    Attributes:
        model: model to load instead of the one the cache names (a directory, hub id or `smollm2-135m`).
        dataset: fresh text (pydoc, a file or a hub id) instead of the cache's token range [start, stop).
        start, stop: token range of the cache whose whole windows are evaluated (stop None: the end).
        max_windows: evaluate at most this many windows (None: all); each costs 1 + n_layers forward passes.
        batch_windows: windows per forward pass; with the vocabulary size it bounds the memory (about three
            float32 arrays of [batch_windows * context_length, vocab] live at once).
    """

    model: str | None = None
    dataset: str | None = None
    start: int = 0
    stop: int | None = None
    max_windows: int | None = None
    batch_windows: int = 8

    def __post_init__(self) -> None:
        if self.start < 0:
            raise InputError(f"--start must be at least 0, got {self.start}")
        if self.stop is not None and self.stop <= self.start:
            raise InputError(f"--stop {self.stop} must be greater than --start {self.start}")
        if self.max_windows is not None and self.max_windows < 1:
            raise InputError(f"--max-windows must be at least 1, got {self.max_windows}")
        if self.batch_windows < 1:
            raise InputError(f"--batch-windows must be at least 1, got {self.batch_windows}")

    def check_used(self, splice: bool) -> None:
        """Refuse window options given without --splice (eval and compare), where nothing would read them."""
        if not splice and self != SpliceConfig(start=self.start, stop=self.stop):
            raise InputError("--model, --dataset, --max-windows and --batch-windows only apply with --splice (add it)")


class WindowBatch(NamedTuple):
    """Context windows. Shapes: token_ids [B, T] int64; trainable [B, T] bool (where the SAE is spliced in)."""

    token_ids: np.ndarray
    trainable: np.ndarray


class SpliceTarget(NamedTuple):
    """An SAE spliced in after block `layer`; `lens`: its translator for that block alone (None: a plain SAE)."""

    layer: int
    sae: TopKSAE
    lens: Lens | None = None


# ---------------------------------------------------------------------------------------------- windows


def whole_windows(sequence: np.ndarray, position: np.ndarray, context_length: int) -> np.ndarray:
    """Row offsets of the windows held whole by these rows: position 0 at i, position T - 1 of the same
    sequence at i + T - 1. Shapes: sequence, position [n] -> [n_windows] int64."""
    n, ctx = len(position), context_length
    starts = np.flatnonzero(position[: max(n - ctx + 1, 0)] == 0)
    ends = starts + ctx - 1
    whole = (position[ends] == ctx - 1) & (sequence[ends] == sequence[starts])
    return starts[whole].astype(np.int64)


def cache_window_batches(
    cache: Cache, start: int, stop: int | None, batch_windows: int, max_windows: int | None
) -> Iterator[WindowBatch]:
    """Batches of the whole windows inside the cache's token range [start, stop), rebuilt from token ids."""
    start, stop = cache.token_range(start, stop)
    ctx = cache.meta.context_length
    tokens = cache.tokens(start, stop)
    offsets = whole_windows(tokens.sequence, tokens.position, ctx)[:max_windows]
    if len(offsets) == 0:
        raise InputError(
            f"token range [{start}, {stop}) of {cache.path} holds no whole window of {ctx} tokens "
            "(widen --start/--stop, or pass --dataset for fresh text)"
        )
    for first in range(0, len(offsets), batch_windows):
        rows = offsets[first : first + batch_windows, None] + np.arange(ctx)
        yield WindowBatch(tokens.token_ids[rows].astype(np.int64), tokens.trainable[rows])


def text_window_batches(
    spec: TextSpec,
    tokenizer: Any,
    context_length: int,
    policy: TrainablePolicy,
    batch_windows: int,
    max_windows: int | None,
) -> Iterator[WindowBatch]:
    """Batches of fresh windows of `spec`, cut as the harvest cuts them, at most `max_windows` in all."""
    special = sorted(set(tokenizer.all_special_ids))
    left = max_windows
    for windows in window_batches(spec, tokenizer, context_length, batch_windows):
        windows = windows[:left] if left is not None else windows
        yield WindowBatch(windows.astype(np.int64), policy.window_mask(windows, special))
        if left is not None:
            left -= len(windows)
            if left <= 0:
                return


# ---------------------------------------------------------------------------------------------- the hook


def reconstruct(
    sae: TopKSAE, x: Tensor, mask: Tensor, batch_rows: int = SAE_BATCH_ROWS, lens: Lens | None = None
) -> Tensor:
    """x with the rows where `mask` is set replaced by the SAE reconstruction (raw units, x's dtype); with a
    one-layer `lens`, T^-1(sae(T(x)).x_hat).

    Shapes: x [B, T, d], mask [B, T] bool -> [B, T, d]. The SAE runs on at most `batch_rows` rows at a time.
    """
    flat = x.reshape(-1, x.shape[-1])
    out = flat.clone()
    rows = torch.nonzero(mask.reshape(-1)).squeeze(1)
    for chunk in rows.split(batch_rows):
        if lens is None:
            out[chunk] = sae(flat[chunk]).x_hat.to(x.dtype)
        else:
            out[chunk] = lens.untranslate(sae(lens.translate(flat[chunk], 0)).x_hat, 0).to(x.dtype)
    return out.view_as(x)


def splice_hook(
    sae: TopKSAE, mask: Tensor, batch_rows: int = SAE_BATCH_ROWS, lens: Lens | None = None
) -> Callable[[nn.Module, Any, Any], Any]:
    """A forward hook returning the block's output with the stream replaced at `mask` [B, T] (same type)."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        return with_stream(output, reconstruct(sae, block_output(output), mask, batch_rows, lens))

    return hook


@contextmanager
def spliced(
    block: nn.Module, sae: TopKSAE, mask: Tensor, batch_rows: int = SAE_BATCH_ROWS, lens: Lens | None = None
) -> Iterator[None]:
    """Within the block, every forward of the model replaces `block`'s output at `mask` by its reconstruction."""
    handle = block.register_forward_hook(splice_hook(sae, mask, batch_rows, lens))
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- metrics


def token_metrics(clean: Tensor, spliced_: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-prediction clean CE, spliced CE, KL(p_clean || p_spliced) and KL(p_spliced || p_clean), all in nats.

    Shapes: clean, spliced_ [N, V] log-probabilities, target [N] int64 -> four [N] tensors.
    """
    ce_clean = -clean.gather(1, target[:, None]).squeeze(1)
    ce_spliced = -spliced_.gather(1, target[:, None]).squeeze(1)
    kl_clean_spliced = (clean.exp() * (clean - spliced_)).sum(1)
    kl_spliced_clean = (spliced_.exp() * (spliced_ - clean)).sum(1)
    return ce_clean, ce_spliced, kl_clean_spliced, kl_spliced_clean


def _log_probs(model: nn.Module, token_ids: Tensor, predicted: Tensor) -> Tensor:
    """float32 log-probabilities of the predictions at `predicted` [B, T]: [N, V]."""
    logits = model(input_ids=token_ids, use_cache=False).logits
    return torch.log_softmax(logits[predicted].float(), dim=-1)


class _Sums:
    """float64 sums over predictions: clean CE, and per target the delta CE and the KL."""

    def __init__(self, n_targets: int) -> None:
        self.n, self.n_windows, self.clean = 0, 0, 0.0
        self.delta, self.kl, self.kl_reverse = np.zeros(n_targets), np.zeros(n_targets), np.zeros(n_targets)

    def result(self, targets: Sequence[SpliceTarget]) -> SpliceMetrics:
        if self.n == 0:
            raise InputError("no prediction was made at a trainable position (give more text or longer windows)")
        delta, kl, reverse = ((a / self.n).tolist() for a in (self.delta, self.kl, self.kl_reverse))
        return SpliceMetrics(
            layer=[t.layer for t in targets],
            delta_ce=delta,
            kl=kl,
            kl_clean_spliced=kl,
            kl_spliced_clean=reverse,
            clean_ce=self.clean / self.n,
            delta_ce_mean=float(np.mean(delta)),
            kl_mean=float(np.mean(kl)),
            kl_spliced_clean_mean=float(np.mean(reverse)),
            n_windows=self.n_windows,
            n_predicted=self.n,
        )


@torch.inference_mode()
def splice_metrics(
    model: nn.Module,
    targets: Sequence[SpliceTarget],
    batches: Iterator[WindowBatch],
    sae_batch_rows: int = SAE_BATCH_ROWS,
    progress: Progress = no_progress,
) -> SpliceMetrics:
    """Delta CE and KL of every target (an SAE at a layer) over `batches`; see the module docstring.

    One clean forward per batch, then one spliced forward per target. `progress` gets windows done.
    """
    blocks = find_blocks(model)
    device = next(model.parameters()).device
    sums = _Sums(len(targets))
    progress(0)  # the display opens now (and closes the stage before), not after the first batch
    for batch in batches:
        token_ids = torch.from_numpy(batch.token_ids).to(device)
        mask = torch.from_numpy(batch.trainable).to(device)
        predicted = mask.clone()
        predicted[:, -1] = False  # the last position has no next token inside the window
        target = token_ids[:, 1:][predicted[:, :-1]]
        clean = _log_probs(model, token_ids, predicted)
        for i, t in enumerate(targets):
            with spliced(blocks[t.layer], t.sae, mask, sae_batch_rows, t.lens):
                after = _log_probs(model, token_ids, predicted)
            ce_clean, ce_spliced, kl, kl_reverse = token_metrics(clean, after, target)
            sums.delta[i] += float((ce_spliced.double() - ce_clean.double()).sum())
            sums.kl[i] += float(kl.double().sum())
            sums.kl_reverse[i] += float(kl_reverse.double().sum())
        sums.clean += float(-clean.gather(1, target[:, None]).double().sum())
        sums.n += int(target.numel())
        sums.n_windows += len(batch.token_ids)
        progress(len(batch.token_ids))
    return sums.result(targets)


# ---------------------------------------------------------------------------------------------- entry points


def check_model(loaded: LoadedModel, targets: Sequence[SpliceTarget]) -> None:
    """Every target's SAE must have the model's width, and its layer must be one of the model's blocks."""
    info = loaded.info
    for t in targets:
        if t.sae.cfg.d_model != info.d_model:
            raise InputError(
                f"the SAE has d_model {t.sae.cfg.d_model} but model {info.name} has {info.d_model} "
                "(splice it into the model it was trained on, or pass the right --model)"
            )
        if not 0 <= t.layer < info.n_layers:
            raise InputError(f"layer {t.layer} is not a block of model {info.name} (it has 0..{info.n_layers - 1})")


def window_source(cache: Cache, loaded: LoadedModel, cfg: SpliceConfig) -> Iterator[WindowBatch]:
    """The windows `cfg` asks for: fresh text when cfg.dataset is set, else the cache's token range."""
    if cfg.dataset is not None:
        return text_window_batches(
            TextSpec(cfg.dataset),
            loaded.tokenizer,
            cache.meta.context_length,
            cache.meta.policy,
            cfg.batch_windows,
            cfg.max_windows,
        )
    return cache_window_batches(cache, cfg.start, cfg.stop, cfg.batch_windows, cfg.max_windows)


def splice_targets(
    cache: Cache,
    targets: Sequence[SpliceTarget],
    cfg: SpliceConfig,
    device: torch.device,
    loaded: LoadedModel | None = None,
    progress: Progress = no_progress,
) -> SpliceMetrics:
    """Delta CE and KL of every target on the model of `cache` (cfg.model, or `loaded`, instead) on `device`."""
    loaded = loaded or load_cache_model(cache.meta.model, device=str(device), override=cfg.model)
    check_model(loaded, targets)
    batches = window_source(cache, loaded, cfg)
    return splice_metrics(loaded.model, targets, batches, progress=progress)


def splice_evaluate(
    sae: TopKSAE,
    cache: Cache,
    layers: Sequence[int],
    cfg: SpliceConfig,
    loaded: LoadedModel | None = None,
    progress: Progress = no_progress,
    lens: Lens | None = None,
) -> SpliceMetrics:
    """Delta CE and KL of `sae` spliced in at each of `layers` (the model loads on the SAE's device); `lens`: the
    SAE's lens, for the translators of `layers`."""
    targets = [SpliceTarget(layer, sae, lens.select((layer,)) if lens else None) for layer in layers]
    return splice_targets(cache, targets, cfg, sae.b_dec.device, loaded, progress)
