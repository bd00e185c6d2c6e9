"""Capture the residual stream after selected decoder blocks (resid_post) with forward hooks.

Hooks on the block modules are exact: the output of block i is `hidden_states[i + 1]` for i < L - 1, and for the
last block it is the stream *before* the final norm (`hidden_states[-1]` is after it). Newer transformers return
a tensor from a decoder layer, older ones a tuple whose first element is the stream: both are handled. Once the
last selected block has run, the forward pass is stopped, so blocks after it, the final norm and the LM head are
never computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the hook of the last selected block to skip the rest of the model."""


def block_output(output: Any) -> torch.Tensor:
    """The residual stream from a block's output (a tensor, or a tuple whose first item is it)."""
    return output[0] if isinstance(output, tuple) else output


class ResidCapture:
    """Runs `model` on token ids and returns resid_post of `layers` stacked as [batch, seq, n_layers, d_model]."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, layers: Sequence[int]) -> None:
        self.model = model
        self.blocks = blocks
        self.layers = list(layers)
        self._outputs: dict[int, torch.Tensor] = {}

    def _hook(self, layer: int, last: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._outputs[layer] = block_output(output)
            if last:
                raise _StopForward

        return hook

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        last = max(self.layers)
        handles = [self.blocks[i].register_forward_hook(self._hook(i, i == last)) for i in set(self.layers)]
        self._outputs = {}
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return torch.stack([self._outputs[i] for i in self.layers], dim=2)
