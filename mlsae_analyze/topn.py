"""A running top-n of many groups at once, fed in order: what the examples and the explorer's index keep of a
stream of (group, value, code) entries without holding the stream."""

from __future__ import annotations

import numpy as np

EMPTY = -1
"""The code of an empty slot."""
BUFFER = 1 << 18
"""Entries a `TopN` buffers before it merges them (about 6 MB)."""


class TopN:
    """The running n largest values of each of G groups, ties to the smaller code: values [G, n] (descending,
    -inf = empty) and codes [G, n] (EMPTY = empty).

    An offer keeps only the entries above its group's n-th value so far, in a buffer; when the buffer holds
    `buffer` entries (and at the end) one sort merges it into the groups it touches. Each group's threshold then
    rises, so most of a long pass is a gather and a compare. Offers must bring each group's entries in increasing
    code order (across calls and within one), as the passes do (rows in order): then every entry of a group that
    is buffered has a larger code than those it holds, and the merge breaks ties by position alone."""

    def __init__(self, n_groups: int, n: int, buffer: int | None = None) -> None:
        self.n, self.buffer = n, buffer or BUFFER
        self.values = np.full((n_groups, n), -np.inf)
        self.codes = np.full((n_groups, n), EMPTY, dtype=np.int64)
        self.threshold = np.full(n_groups, -np.inf)
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._held = 0

    def offer(self, group: np.ndarray, value: np.ndarray, code: np.ndarray) -> None:
        keep = value > self.threshold[group]
        if keep.any():
            self._parts.append((group[keep], value[keep], code[keep]))
            self._held += int(keep.sum())
        if self._held >= self.buffer:
            self.merge()

    def merge(self) -> None:
        """Merge the buffered entries into the groups' n largest: the buffer's n largest per group (one stable
        sort by group, then value down, so equal values keep their code order), then, per touched group, those
        beside the n it held (a small sort of 2n per group; held codes are the smaller ones)."""
        if not self._parts:
            return
        group, value, code = (np.concatenate(part) for part in zip(*self._parts, strict=True))
        self._parts, self._held = [], 0
        order = np.lexsort((-value, group))
        group, value, code = group[order], value[order], code[order]
        start = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
        size = np.diff(np.append(start, len(group)))
        rank = np.arange(len(group)) - np.repeat(start, size)
        kept = rank < self.n
        touched = group[start]
        at = np.repeat(np.arange(len(start)), size)[kept]
        fresh_values = np.full((len(touched), self.n), -np.inf)
        fresh_codes = np.full((len(touched), self.n), EMPTY, dtype=np.int64)
        fresh_values[at, rank[kept]] = value[kept]
        fresh_codes[at, rank[kept]] = code[kept]
        values = np.concatenate([self.values[touched], fresh_values], axis=1)
        codes = np.concatenate([self.codes[touched], fresh_codes], axis=1)
        best = np.argsort(-values, axis=1, kind="stable")[:, : self.n]
        self.values[touched] = np.take_along_axis(values, best, 1)
        self.codes[touched] = np.take_along_axis(codes, best, 1)
        self.threshold[touched] = self.values[touched, -1]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, codes), each [G, n]."""
        self.merge()
        return self.values, self.codes
