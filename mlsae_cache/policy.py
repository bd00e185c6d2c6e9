"""Which tokens are trainable: one rule for the harvest, splicing, the prompt heatmap and the explorer.

A harvest stores every token but marks some as not trainable, so training and statistics skip them: special
tokens (BOS/EOS/pad: the reference code zeroes them) and position 0 of every window (many models put a huge
"attention sink" there, e.g. |x| about 27,000 in SmolLM2, which would dominate any squared error). The policy a
cache was made with is recorded in its metadata (`trainable_policy`), and everything that rebuilds trainable
masks from tokens reads it from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TrainablePolicy:
    """Which tokens are left out of training and statistics."""

    exclude_special_tokens: bool = True
    exclude_position_0: bool = True

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrainablePolicy:
        """The recorded policy; a missing key means excluding, as harvests always did."""
        data = data or {}
        return cls(bool(data.get("exclude_special_tokens", True)), bool(data.get("exclude_position_0", True)))

    def mask(self, token_ids: np.ndarray, position: np.ndarray, special_ids: Sequence[int]) -> np.ndarray:
        """True where a token is trainable. token_ids, position: same shape (e.g. [n] or [B, T]) -> bool, that shape."""
        keep = np.ones(np.shape(token_ids), dtype=bool)
        if self.exclude_special_tokens:
            keep &= ~np.isin(token_ids, np.asarray(sorted(set(special_ids)), dtype=np.int64))
        if self.exclude_position_0:
            keep &= np.asarray(position) != 0
        return keep

    def window_mask(self, windows: np.ndarray, special_ids: Sequence[int]) -> np.ndarray:
        """`mask` of whole windows [B, T] (window position t of every row is t)."""
        position = np.broadcast_to(np.arange(windows.shape[-1]), windows.shape)
        return self.mask(windows, position, special_ids)


HARVEST_POLICY = TrainablePolicy()
"""What a harvest excludes: special tokens and position 0."""

IMPORT_POLICY = TrainablePolicy(exclude_special_tokens=False, exclude_position_0=False)
"""An imported array has no known special tokens or windows of a model: every row is trainable."""
