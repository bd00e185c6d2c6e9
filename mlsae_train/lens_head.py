"""The model's final norm and unembedding, all a tuned lens needs of the model, and the KL it is trained on.

The model is loaded once (the one the cache names, or `--model`) and only its final norm and LM head are kept;
the blocks and the input embedding are freed (where the head's weight is tied to the embedding, that one tensor
stays, as the head's). The final distribution p_final comes from the cache's last stored block, which must be the
model's last block: that output, before the final norm, is what the model itself unembeds.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from mlsae_cache.core.errors import InputError
from mlsae_cache.models import find_final_norm, load_cache_model
from mlsae_cache.store import Cache

AUTOCASTS = ("auto", "bf16", "none")


def use_bf16(autocast: str, device: torch.device) -> bool:
    """`auto` is bf16 where the device computes in it (CPU, and CUDA devices that support it)."""
    if autocast not in AUTOCASTS:
        raise InputError(f"--autocast {autocast!r} is not one of {', '.join(AUTOCASTS)}")
    if autocast == "auto":
        return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    return autocast == "bf16"


def check_last_block(cache: Cache, n_layers: int | None) -> None:
    """Refuse a cache whose last stored block is not the model's last (p_final could not be computed from it)."""
    if cache.meta.hook != "resid_post":
        raise InputError(
            f"cache {cache.path} stores {cache.meta.hook!r}; a lens needs the blocks' outputs (resid_post)"
        )
    if n_layers is not None and cache.layers[-1] != n_layers - 1:
        raise InputError(
            f"cache {cache.path} stores blocks up to {cache.layers[-1]}, but the model's last block is {n_layers - 1}: "
            "the lens's target is the model's own final distribution, computed from that block's output (harvest a "
            f"cache whose --layers include {n_layers - 1}, e.g. all)"
        )


def _fingerprint(modules: list[nn.Module]) -> str:
    """sha256 of the modules' float32 parameters (names and values), first 16 hex digits."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class LensHead(nn.Module):
    """unembed(final_norm(h)) of a model, frozen, in float32 (bf16 matrix products under `bf16`)."""

    def __init__(self, norm: nn.Module, unembed: nn.Module, bf16: bool, name: str) -> None:
        super().__init__()
        self.norm, self.unembed, self.bf16, self.name = norm.float(), unembed.float(), bf16, name
        self.requires_grad_(False)
        self.fingerprint = _fingerprint([self.norm, self.unembed])

    def _autocast(self, device: torch.device) -> AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def log_probs(self, h: Tensor) -> Tensor:
        """log softmax(unembed(final_norm(h))) of rows h [N, d]: [N, vocab] float32."""
        with self._autocast(h.device):
            logits = self.unembed(self.norm(h))
        return torch.log_softmax(logits.float(), dim=-1)


def load_head(cache: Cache, model: str | None, device: torch.device, autocast: str) -> LensHead:
    """The final norm and LM head of the cache's model (or `model`), on `device`; the rest of the model is freed."""
    check_last_block(cache, cache.meta.model.get("n_layers") if model is None else None)
    loaded = load_cache_model(cache.meta.model, device=str(device), override=model)
    if loaded.info.d_model != cache.d_model:
        raise InputError(
            f"model {loaded.info.name} has d_model {loaded.info.d_model} but cache {cache.path} has {cache.d_model} "
            "(pass the model the cache was harvested from with --model)"
        )
    check_last_block(cache, loaded.info.n_layers)
    unembed: nn.Module | None = loaded.model.get_output_embeddings()  # type: ignore[operator]
    if unembed is None:
        raise InputError(f"model {loaded.info.name} has no LM head (a lens needs a causal language model)")
    return LensHead(find_final_norm(loaded.model), unembed, use_bf16(autocast, device), loaded.info.name)


def kl_to_final(head: LensHead, target: Tensor, y: Tensor) -> Tensor:
    """KL(p_final || p_lens) per row, in nats: target [N, V] log p_final, y [N, d] translated rows -> [N]."""
    log_p = head.log_probs(y)
    return (target.exp() * (target - log_p)).sum(-1)
