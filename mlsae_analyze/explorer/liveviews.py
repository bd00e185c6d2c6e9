"""The live routes' payloads (api.py) from the live model's results (live.py, liveops.py) and the index: token
text, each activation's quantile among the latent's own activations at that layer, and the steering factors'
typical activations."""

from __future__ import annotations

import functools

import numpy as np
import torch

import mlsae_analyze.explorer.api as api
import mlsae_analyze.explorer.liveops as ops
from mlsae_analyze.explorer.index import ExplorerIndex
from mlsae_analyze.explorer.live import Edit, LiveModel
from mlsae_cache.core.errors import InputError


def activation_quantiles(index: ExplorerIndex, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Quantile of each value [L, P, k] among latent indices[l, p, s]'s activations at layer l in the index's
    store (linear within a histogram bin); NaN where the value is 0 or the latent never fired at that layer."""
    active = values > 0
    latents = np.unique(indices[active])
    out = np.full(values.shape, np.nan)
    if not len(latents):
        return out
    counts, scale = index.histograms(latents)  # [m, 1 + L, B], [m]
    bins = counts.shape[-1]
    cum = np.concatenate([np.zeros((*counts.shape[:2], 1)), np.cumsum(counts, -1)], -1)
    row = np.searchsorted(latents, indices[active])
    tab = 1 + np.broadcast_to(np.arange(values.shape[0])[:, None, None], values.shape)[active]
    where = values[active] / np.maximum(scale[row], 1e-30) * bins
    b = np.clip(np.floor(where).astype(np.int64), 0, bins - 1)
    frac = np.clip(where - b, 0.0, 1.0)
    total = cum[row, tab, bins]
    below = cum[row, tab, b] + frac * counts[row, tab, b]
    with np.errstate(invalid="ignore", divide="ignore"):
        out[active] = np.where(total > 0, np.minimum(below / np.maximum(total, 1), 1.0), np.nan)
    return out


def _nullable(a: np.ndarray) -> list:
    """Nested lists of a float array with None for NaN."""
    rounded = np.round(a, 3).astype(object)
    rounded[np.isnan(a)] = None
    return list(rounded.tolist())


class LiveViews:
    """The payloads of the live routes, over one live model and the index of its SAE."""

    def __init__(self, live: LiveModel, index: ExplorerIndex) -> None:
        self.live, self.index = live, index

    @functools.cached_property
    def _typical(self) -> np.ndarray:
        return self.index.typical()

    def typical(self, latent: int, layer: int) -> float:
        """Latent's mean activation where it fires at `layer` (over all layers where it never fires there)."""
        row = self._typical[latent]
        value = row[1 + self.index.meta.layers.index(layer)] if layer in self.index.meta.layers else np.nan
        value = row[0] if np.isnan(value) else value
        if np.isnan(value):
            raise InputError(
                f"latent {latent} never fires in the store, so it has no typical activation (give the factor with "
                "unit raw)"
            )
        return float(value)

    def _pairs(self, ids: list[int], values: list[float]) -> list[api.TokenValue]:
        return [api.TokenValue(token=t, value=v) for t, v in zip(self.live.token_text(ids), values, strict=True)]

    def prompt(self, body: api.PromptLayersRequest) -> api.Prompt:
        run = self.live.run(body.text)
        quantiles = activation_quantiles(self.index, run.indices, run.values)
        return api.Prompt(
            tokens=self.live.token_text(run.ids),
            trainable=run.trainable.tolist(),
            layers=list(self.live.layers),
            indices=run.indices.tolist(),
            values=np.round(run.values, 5).tolist(),
            quantiles=_nullable(quantiles),
            fvu=run.fvu,
            delta_ce=ops.layer_delta_ce(self.live, run) if body.delta_ce else None,
        )

    def delta_ce(self, body: api.PromptRequest) -> api.PromptDeltaCe:
        run = self.live.run(body.text)
        return api.PromptDeltaCe(layers=list(self.live.layers), delta_ce=ops.layer_delta_ce(self.live, run))

    def logits(self, body: api.LogitsRequest) -> api.Logits:
        run = self.live.run(body.text)
        ops.check_position(run, body.position)
        spliced = ops.recon_logits(self.live, run, body.layer)
        clean, recon = run.logits[body.position], spliced.logits[body.position]
        # logits move by a constant the softmax ignores (a reconstruction can lift them all): rank log-probabilities
        change = torch.log_softmax(recon, -1) - torch.log_softmax(clean, -1)
        ids = run.ids.tolist()
        following = ids[body.position + 1] if body.position + 1 < len(ids) else None
        return api.Logits(
            layer=body.layer,
            position=body.position,
            token=self.live.token_text([ids[body.position]])[0],
            next_token=None if following is None else self.live.token_text([following])[0],
            clean=self._pairs(*ops.top(clean, body.top)),
            recon=self._pairs(*ops.top(recon, body.top)),
            increases=self._pairs(*ops.top(change, body.top)),
            decreases=self._pairs(*ops.top(change, body.top, largest=False)),
            delta_ce=spliced.delta_ce,
            kl=spliced.kl,
        )

    def _edits(self, edits: list[api.Edit]) -> list[Edit]:
        """The request's edits (their number was bounded by the app, 413 above api.MAX_EDITS)."""
        return [Edit(e.latent, e.layer, e.factor, e.mode, e.unit) for e in edits]

    def steer(self, body: api.SteerRequest) -> api.Steer:
        run = self.live.run(body.text)
        edits = self._edits(body.edits)
        logprob = body.measure == "logprob"
        changes = ops.steer(self.live, run, edits, body.positions, self.typical, body.top, logprob)
        tokens = self.live.token_text(run.ids)
        return api.Steer(
            changes=[
                api.PositionChange(
                    position=p, token=tokens[p], increases=self._pairs(*up), decreases=self._pairs(*down)
                )
                for p, (up, down) in enumerate(zip(changes.increases, changes.decreases, strict=True))
            ],
            scales=[api.EditScale(latent=e.latent, layer=e.layer, raw=ops.scale_of(e, self.typical)) for e in edits],
        )

    def generate(self, body: api.GenerateRequest) -> api.Generate:
        run = self.live.run(body.text)
        c = ops.Continuation(body.n_tokens, body.seed, body.temperature)
        default, steered = ops.generate(self.live, run, self._edits(body.edits), body.positions, self.typical, c)
        return api.Generate(
            default=default, steered=steered, n_tokens=body.n_tokens, seed=body.seed, temperature=body.temperature
        )
