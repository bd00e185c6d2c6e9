"""What the live routes compute from a prompt's run (live.py): the model's logits with the reconstruction spliced
in at one layer, delta CE per layer, steering edits and their logit changes, and default and steered
continuations. Every function takes the `LiveModel` and holds its lock while the model runs, so calls from the
server's threads are serialised.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch

from mlsae_analyze.explorer.live import Edit, EditFn, LiveModel, PositionsFn, PromptRun, positions_fn
from mlsae_cache.core.errors import InputError
from mlsae_cache.hooks import block_output, with_stream
from mlsae_train.splice import reconstruct, token_metrics

TypicalFn = Callable[[int, int], float]
"""(latent, block index) -> the latent's typical activation there (its mean where it fires)."""


class TopTokens(NamedTuple):
    """Token ids and values of a top-n list, largest first."""

    ids: list[int]
    values: list[float]


def top(values: torch.Tensor, n: int, largest: bool = True) -> TopTokens:
    got = torch.topk(values, min(n, values.numel()), largest=largest)
    return TopTokens(got.indices.tolist(), got.values.tolist())


def check_layer(live: LiveModel, layer: int) -> None:
    if layer not in live.layers:
        raise InputError(f"layer {layer} is not one of the SAE's layers {list(live.layers)}")


def check_position(run: PromptRun, position: int) -> None:
    if not 0 <= position < len(run.ids):
        raise InputError(f"position {position} is outside the prompt's {len(run.ids)} tokens (0..{len(run.ids) - 1})")


class Spliced(NamedTuple):
    """Logits [P, V] with the reconstruction at one layer, and the prompt's delta CE and KL(clean || spliced)
    over its scored positions (trainable, not the last)."""

    logits: torch.Tensor
    delta_ce: float
    kl: float


def spliced_logits(live: LiveModel, run: PromptRun, layer: int) -> Spliced:
    """The run's logits with block `layer`'s output replaced at trainable positions by its reconstruction (the
    same `reconstruct` as `eval --splice`); the rest of the forward pass runs on."""
    check_layer(live, layer)
    x = run.streams[layer].float()[None]
    mask = torch.from_numpy(run.trainable)[None].to(x.device)
    lens = live.lens.select((layer,)) if live.lens is not None else None
    x_hat = reconstruct(live.sae, x, mask, lens=lens)[0]
    logits = live.rerun(run, layer, x_hat)
    predicted = run.predicted.to(logits.device)
    target = run.ids.to(logits.device)[1:][predicted[:-1]]
    clean, after = (torch.log_softmax(lg[predicted], dim=-1) for lg in (run.logits, logits))
    ce_clean, ce_after, kl, _ = token_metrics(clean, after, target)
    n = max(int(target.numel()), 1)
    return Spliced(logits, float((ce_after.double() - ce_clean.double()).sum()) / n, float(kl.double().sum()) / n)


def recon_logits(live: LiveModel, run: PromptRun, layer: int) -> Spliced:
    """`spliced_logits` under the model's lock."""
    with live.lock, torch.inference_mode():
        return spliced_logits(live, run, layer)


def layer_delta_ce(live: LiveModel, run: PromptRun) -> list[float]:
    """Delta CE of the prompt with the reconstruction spliced in at each stored layer in turn."""
    with live.lock, torch.inference_mode():
        return [spliced_logits(live, run, layer).delta_ce for layer in live.layers]


def scale_of(edit: Edit, typical: TypicalFn) -> float:
    """The raw amount an edit's factor stands for: factor x typical activation, or the factor itself."""
    if edit.mode not in ("add", "clamp") or edit.unit not in ("typical", "raw"):
        raise InputError(f"edit {tuple(edit)}: mode must be add or clamp and unit typical or raw")
    return edit.factor * (typical(edit.latent, edit.layer) if edit.unit == "typical" else 1.0)


def edit_fn(live: LiveModel, edits: list[Edit], where: PositionsFn, typical: TypicalFn) -> EditFn:
    """The steering of `edits` as a function of (block, stream [1, n, d], start), editing the positions that
    `where` picks among start..start+n-1.

    Add: x + f sigma W_dec[j]; clamp: x + (f - a_j) sigma W_dec[j], sigma the row's std as the SAE standardises
    it (1 without standardisation) and a_j the SAE's activation of latent j at the row. Under a lens the change
    is made in the lens's space and mapped to the stream by (I + A_l)^-1.
    """
    n = live.sae.cfg.n_latents
    for e in edits:
        check_layer(live, e.layer)
        if not 0 <= e.latent < n:
            raise InputError(f"latent {e.latent} does not exist (this SAE has latents 0..{n - 1})")
    by_block = {b: [(e, scale_of(e, typical)) for e in edits if e.layer == b] for b in {e.layer for e in edits}}

    def apply(block: int, h: torch.Tensor, start: int) -> torch.Tensor:
        if block not in by_block:
            return h
        x = h[0].to(live.sae.b_dec.dtype)
        std = live.sae.standardize(live.sae_rows(x, block))
        enc = live.sae.encode(std.x_std) if any(e.mode == "clamp" for e, _ in by_block[block]) else None
        mask = torch.from_numpy(where(start, len(x))).to(x.device)
        delta = torch.zeros_like(x)
        for e, f in by_block[block]:
            amount = torch.full((len(x),), f, dtype=x.dtype, device=x.device)
            if enc is not None and e.mode == "clamp":
                amount = amount - torch.where(enc.indices == e.latent, enc.values, 0.0).sum(-1).to(x.dtype)
            delta += (amount * mask)[:, None] * std.sigma * live.sae.W_dec[e.latent]
        return (x + live.raw_change(delta, block)).to(h.dtype)[None]

    return apply


class PositionChanges(NamedTuple):
    """Per position, the largest logit increases and decreases: token ids and values [P][n]."""

    increases: list[TopTokens]
    decreases: list[TopTokens]


def _first_layer(edits: list[Edit]) -> int:
    if not edits:
        raise InputError("no edit given (add at least one (latent, layer, factor))")
    return min(e.layer for e in edits)


def steer(
    live: LiveModel,
    run: PromptRun,
    edits: list[Edit],
    positions: str,
    typical: TypicalFn,
    n: int,
    logprob: bool = False,
) -> PositionChanges:
    """Logit changes (`logprob`: log-probability changes) at every position from `edits` at `positions` (all,
    from:P, only:P). The model re-runs from the earliest edited layer; the baseline is re-run the same way, so a
    zero edit changes nothing at all."""
    first = _first_layer(edits)
    apply = edit_fn(live, edits, positions_fn(positions, len(run.ids)), typical)
    with live.lock, torch.inference_mode():
        base = live.rerun(run, first, run.streams[first])
        steered = live.rerun(run, first, apply(first, run.streams[first][None], 0)[0], apply)
    if logprob:
        steered, base = torch.log_softmax(steered, -1), torch.log_softmax(base, -1)
    change = steered - base
    return PositionChanges([top(c, n) for c in change], [top(c, n, largest=False) for c in change])


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature) with `gen`."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


class Continuation(NamedTuple):
    """Sampling settings of a continuation."""

    n_tokens: int
    seed: int
    temperature: float


def _edit_hooks(live: LiveModel, apply: EditFn, blocks: set[int], offset: list[int]) -> list[object]:
    """Forward hooks running `apply` after each block in `blocks`, at the absolute positions from offset[0]."""

    def hook(b: int) -> object:
        def fn(module: torch.nn.Module, args: object, output: object) -> object:
            return with_stream(output, apply(b, block_output(output), offset[0]))

        return fn

    return [live.blocks[b].register_forward_hook(hook(b)) for b in sorted(blocks)]  # type: ignore[arg-type]


def continue_ids(
    live: LiveModel, ids: torch.Tensor, apply: EditFn | None, blocks: set[int], c: Continuation
) -> list[int]:
    """Up to c.n_tokens token ids sampled after `ids` (stopping after the end-of-text token), with the model's KV
    cache; `apply` edits the stream after `blocks`, new tokens included (each step knows its absolute position)."""
    gen = torch.Generator().manual_seed(c.seed)
    offset = [0]
    handles = _edit_hooks(live, apply, blocks, offset) if apply is not None else []
    out: list[int] = []
    eos = live.loaded.tokenizer.eos_token_id
    # transformers 5 renamed the KV cache argument and output field from past_key_values to cache
    named = "cache" if "cache" in inspect.signature(live.model.forward).parameters else "past_key_values"
    try:
        step, past = ids[None].to(live.device), None
        for _ in range(c.n_tokens):
            result = live.model(input_ids=step, use_cache=True, **{named: past})
            offset[0] += step.shape[1]
            past = getattr(result, named)
            token = _sample(result.logits[0, -1], c.temperature, gen)
            out.append(token)
            if token == eos:
                break
            step = torch.tensor([[token]], device=live.device)
    finally:
        for handle in handles:
            handle.remove()  # type: ignore[attr-defined]
    return out


def generate(
    live: LiveModel, run: PromptRun, edits: list[Edit], positions: str, typical: TypicalFn, c: Continuation
) -> tuple[str, str]:
    """The default and the steered continuation of the prompt, each drawn with a generator seeded c.seed."""
    apply = edit_fn(live, edits, positions_fn(positions, len(run.ids)), typical) if edits else None
    blocks = {e.layer for e in edits}
    with live.lock, torch.inference_mode():
        default = continue_ids(live, run.ids, None, set(), c)
        steered = continue_ids(live, run.ids, apply, blocks, c) if apply is not None else default
    decode = live.loaded.tokenizer.decode
    return decode(default), decode(steered)
