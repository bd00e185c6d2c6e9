"""The explorer's live model: any prompt through the model and the SAE at every stored layer, the model's logits
with the reconstruction spliced in at one layer, steering edits and generation.

One prompt is run once (`LiveModel.run`, kept in a small LRU per text): every block's output (the residual
stream after it, float32 on the CPU copy we keep) and the arguments every block was called with are captured by
hooks on a plain forward pass of the model. Anything that changes the stream after block l then re-runs only
blocks l+1.. with those arguments, then the final norm and the LM head (`rerun`): the model is never run again
from the embeddings. Whether that shortcut reproduces the model's own forward pass is checked when the model is
loaded (on a short probe text, to float tolerance); where it does not (an architecture whose blocks share state
the hooks cannot see), every edit runs the whole model with forward hooks instead, the slow path.

Rows follow the cache's trainable policy, as the harvest and `eval --splice` do: position 0 and special tokens
are encoded and shown but marked untrainable, left out of the FVU, and never replaced by a reconstruction
(the SAE never saw them). Steering acts on the positions it is given, trainable or not.

Steering, in raw units of the residual stream. The SAE decodes in standardised space, x^ = sigma (W_dec a +
b_dec) + mu with sigma, mu the row's own std and mean, so raising latent j by f at a row adds f sigma W_dec[j]
to the stream (mode add); clamping sets a_j to f and adds (f - a_j) sigma W_dec[j], a_j being the SAE's
activation of j at that row. A factor is in units of the latent's typical activation at that layer (its mean
where it fires, from the index) unless `unit` is "raw".
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from mlsae_analyze.prompt import prompt_tokens
from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import InputError
from mlsae_cache.hooks import block_output, with_stream
from mlsae_cache.models import LoadedModel, find_blocks, find_final_norm, load_cache_model
from mlsae_cache.store import CacheMeta
from mlsae_cache.text import token_stream
from mlsae_train.lens import Lens
from mlsae_train.loss import fvu_per_layer
from mlsae_train.sae import TopKSAE

log = logging.getLogger(__name__)

MODES = ("add", "clamp")
UNITS = ("typical", "raw")
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
"""What the start-up check of the re-run shortcut runs."""
RERUN_RTOL = 1e-4
"""Largest difference of the re-run's logits from the model's own, relative to the logits' largest magnitude."""

EditFn = Callable[[int, torch.Tensor, int], torch.Tensor]
"""(block index, stream [1, n, d] after that block at absolute positions start.., start) -> the stream the next
block gets."""


class PromptTooLong(InputError):
    """A prompt over the server's token limit (the routes answer 413)."""


class Edit(NamedTuple):
    """One steering edit: latent, block index, factor, mode (add, clamp) and unit (typical, raw)."""

    latent: int
    layer: int
    factor: float
    mode: str = "add"
    unit: str = "typical"


PositionsFn = Callable[[int, int], np.ndarray]
"""(start, n) -> which of the absolute positions start..start+n-1 an edit touches, [n] bool."""


def positions_fn(positions: str, n_prompt: int) -> PositionsFn:
    """The positions "all", "from:p" (p and after, new tokens included) or "only:p" of a prompt of n_prompt
    tokens, as a function of a span of absolute positions. InputError for anything else."""
    kind, _, value = positions.partition(":")
    if kind == "all" and not value:
        return lambda start, n: np.ones(n, bool)
    if kind in ("from", "only") and value.isdigit() and int(value) < n_prompt:
        p = int(value)
        if kind == "from":
            return lambda start, n: np.arange(start, start + n) >= p
        return lambda start, n: np.arange(start, start + n) == p
    raise InputError(f"positions {positions!r} must be all, from:P or only:P with P in [0, {n_prompt - 1}]")


@dataclass
class PromptRun:
    """One prompt through the model: token ids [P] and which are trainable [P]; every block's output
    `streams` [n_blocks][P, d] in the model's dtype (what re-runs start from); each block's call arguments but
    the stream; the clean logits [P, V] float32; and the SAE's top-k of every stored layer, indices and values
    [L, P, k], with the per-layer FVU over trainable rows [L]."""

    ids: torch.Tensor
    trainable: np.ndarray
    streams: list[torch.Tensor]
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    logits: torch.Tensor
    indices: np.ndarray
    values: np.ndarray
    fvu: list[float | None]

    @property
    def predicted(self) -> torch.Tensor:
        """Positions whose next token is scored (trainable, not the last): [P] bool."""
        mask = torch.from_numpy(self.trainable.copy())
        mask[-1] = False
        return mask


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float | None:
    """FVU of rows x [n, d] by x_hat (training's `fvu_per_layer`, in float64, all rows one layer); None where it
    is undefined (no rows, or rows without variance)."""
    value = float(fvu_per_layer(x.double(), x_hat.double(), torch.zeros(len(x), dtype=torch.long), 1)[0])
    return None if math.isnan(value) else value


class LiveModel:
    """The model and the SAE behind the live routes. Calls are serialised by one lock (one device); prompts
    are kept in an LRU of `lru_size` texts."""

    def __init__(
        self,
        loaded: LoadedModel,
        sae: TopKSAE,
        layers: Sequence[int],
        cache_meta: CacheMeta,
        max_prompt_tokens: int = 256,
        lru_size: int = 8,
        lens: Lens | None = None,
    ) -> None:
        self.loaded, self.sae, self.layers = loaded, sae, tuple(layers)
        self.lens = lens.select(self.layers).to(sae.b_dec.device) if lens is not None else None
        self.meta, self.max_prompt_tokens = cache_meta, max_prompt_tokens
        self.model: nn.Module = loaded.model
        self.blocks = find_blocks(self.model)
        self.norm = find_final_norm(self.model)
        head = self.model.get_output_embeddings()  # type: ignore[operator]
        if not isinstance(head, nn.Module):
            raise InputError(f"model {loaded.info.name} has no LM head (give a causal language model with --model)")
        self.head: nn.Module = head
        self.device = next(self.model.parameters()).device
        self.lock = threading.RLock()
        self._runs: collections.OrderedDict[str, PromptRun] = collections.OrderedDict()
        self.lru_size = lru_size
        self.rerun_ok = self._check_rerun()

    # ------------------------------------------------------------------------------------------ one prompt

    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and the trainable mask of `text`, as the harvest makes them (InputError when too long)."""
        n = len(next(iter(token_stream([text], self.loaded.tokenizer))))
        if n > self.max_prompt_tokens:
            raise PromptTooLong(
                f"the text is {n} tokens long, over this server's limit of {self.max_prompt_tokens} "
                "(shorten it, or restart explore with a larger --max-prompt-tokens)"
            )
        return prompt_tokens(text, self.loaded.tokenizer, self.meta)

    def token_text(self, ids: np.ndarray | torch.Tensor | list[int]) -> list[str]:
        return [self.loaded.tokenizer.decode([int(i)]) for i in ids]

    def run(self, text: str) -> PromptRun:
        """The prompt's run, from the LRU or computed now (under the model's lock)."""
        with self.lock:
            return self._run(text)

    def _run(self, text: str) -> PromptRun:
        if text in self._runs:
            self._runs.move_to_end(text)
            return self._runs[text]
        ids, trainable = self.tokenize(text)
        run = self._forward(torch.from_numpy(ids), trainable)
        self._runs[text] = run
        while len(self._runs) > self.lru_size:
            self._runs.popitem(last=False)
        return run

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, trainable: np.ndarray) -> PromptRun:
        n = len(self.blocks)
        calls: list[Any] = [None] * n
        streams: list[Any] = [None] * n

        def before(b: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                calls[b] = (args[1:], rest)

            return hook

        def after(b: int) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                streams[b] = block_output(output)[0].detach()

            return hook

        handles = [blk.register_forward_pre_hook(before(b), with_kwargs=True) for b, blk in enumerate(self.blocks)]
        handles += [blk.register_forward_hook(after(b)) for b, blk in enumerate(self.blocks)]
        try:
            logits = self.model(input_ids=ids[None].to(self.device), use_cache=False).logits[0].float()
        finally:
            for h in handles:
                h.remove()
        indices, values, fvus = self._encode(streams, trainable)
        return PromptRun(ids, trainable, streams, calls, logits, indices, values, fvus)

    def sae_rows(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Rows [n, d] of block `layer` as the SAE reads them: float32, translated by the lens it was fitted with."""
        x = x.to(self.sae.b_dec.device, torch.float32)
        return self.lens.translate(x, self.layers.index(layer)) if self.lens is not None else x

    def raw_change(self, delta: torch.Tensor, layer: int) -> torch.Tensor:
        """A change [n, d] of the SAE's input space in raw units of the stream: (I + A_l)^-1 delta under a lens."""
        if self.lens is None:
            return delta
        return delta @ self.lens.inverse()[self.layers.index(layer)].T

    def _encode(self, streams: list[torch.Tensor], trainable: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
        """Top-k of every stored layer's rows, and the FVU of the trainable ones in raw units (under a lens, of
        the reconstruction mapped back through the lens's inverse)."""
        indices, values, fvus = [], [], []
        keep = torch.from_numpy(trainable)
        for layer in self.layers:
            x = streams[layer].float()
            out = self.sae(self.sae_rows(x, layer))
            x_hat = out.x_hat.float()
            if self.lens is not None:
                x_hat = self.lens.untranslate(x_hat, self.layers.index(layer))
            indices.append(out.indices.to(torch.int32).cpu().numpy())
            values.append(out.values.float().cpu().numpy())
            fvus.append(fvu(x.cpu()[keep], x_hat.cpu()[keep]))
        return np.stack(indices), np.stack(values), fvus

    # ------------------------------------------------------------------------------------------ re-runs

    def rerun(self, run: PromptRun, first: int, stream: torch.Tensor, edit: EditFn | None = None) -> torch.Tensor:
        """Logits [P, V] float32 with `stream` [P, d] as the output of block `first`, `edit` applied after each
        later block: blocks first+1.. re-run from the captured call arguments (or, where that shortcut failed its
        start-up check, the whole model with hooks)."""
        if not self.rerun_ok:
            return self._hooked(run, first, stream, edit)
        h = stream[None].to(run.streams[first].dtype)
        for b in range(first + 1, len(self.blocks)):
            args, kwargs = run.calls[b]
            h = block_output(self.blocks[b](h, *args, **kwargs))
            h = edit(b, h, 0) if edit is not None else h
        return self.head(self.norm(h))[0].float()

    def _hooked(self, run: PromptRun, first: int, stream: torch.Tensor, edit: EditFn | None) -> torch.Tensor:
        """The slow path of `rerun`: the whole model, with block `first`'s output replaced and `edit` hooked."""

        def replace(b: int) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> Any:
                h = stream[None].to(block_output(output).dtype) if b == first else block_output(output)
                return with_stream(output, edit(b, h, 0) if edit is not None and b > first else h)

            return hook

        handles = [blk.register_forward_hook(replace(b)) for b, blk in enumerate(self.blocks) if b >= first]
        try:
            return self.model(input_ids=run.ids[None].to(self.device), use_cache=False).logits[0].float()
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def _check_rerun(self) -> bool:
        """Whether re-running blocks 1.. from block 0's captured output reproduces the model's logits."""
        ids, trainable = prompt_tokens(PROBE_TEXT, self.loaded.tokenizer, self.meta)
        run = self._forward(torch.from_numpy(ids), trainable)
        self.rerun_ok = True
        again = self.rerun(run, 0, run.streams[0])
        gap = float((again - run.logits).abs().max())
        scale = float(run.logits.abs().max()) or 1.0
        if gap > RERUN_RTOL * scale:
            name = self.loaded.info.name
            log.warning("re-running the blocks of %s misses its logits by %.3g; edits run the whole model", name, gap)
            return False
        return True


def load_live_model(
    model: str,
    device: str,
    sae: TopKSAE,
    layers: Sequence[int],
    cache_meta: CacheMeta,
    max_prompt_tokens: int,
    lens: Lens | None = None,
) -> LiveModel:
    """Load `model` on `device` ("cache": the model the cache names) and check that it fits the SAE; `lens`: the
    lens the SAE was fitted with (its rows are translated before encoding, and reconstructions mapped back)."""
    loaded = load_cache_model(cache_meta.model, device=str(resolve_device(device)), override=_override(model))
    n_blocks, d_model = loaded.info.n_layers, loaded.info.d_model
    if d_model != sae.cfg.d_model or max(layers) >= n_blocks:
        raise InputError(
            f"model {loaded.info.name} ({n_blocks} blocks, d_model {d_model}) does not fit the SAE (layers "
            f"{list(layers)}, d_model {sae.cfg.d_model}); pass the model the cache was harvested from"
        )
    sae = sae.to(next(loaded.model.parameters()).device)
    return LiveModel(loaded, sae, layers, cache_meta, max_prompt_tokens, lens=lens)


def _override(model: str) -> str | None:
    return None if model == "cache" else model
