"""Exact top-k of each row of a CPU tensor, for the TopK encoder (k of n latents per row, k much smaller than n),
as a numba kernel. Why by hand: `torch.topk` on a CPU costs about as much as the encoder's bf16 product (21-24 ms
on 2 threads against 24-27 ms at B 4,096, n 4,608, k 32), and no library offers a faster exact selection; this
kernel takes 14-15 ms there on one thread, in float32 and in bfloat16.

How a row is selected. Values are compared as integers: a float's bits b (w of them, read as a signed integer),
with the bits below the sign flipped where the sign is set, b ^ ((b >> (w - 1)) & (2^(w-1) - 1)), order as the
floats do; NaN, of either sign, is mapped above +inf, as `torch.topk` ranks NaN largest. The row's n positions are
dealt into G = ceil(n / GROUP) groups, group g holding positions g, g + G, g + 2G, ...
1. Each group's maximum: a running maximum over the row's stripes of G values, which vectorises.
2. A lower bound tau of the row's k-th largest value: the least of the maxima of k disjoint runs of groups (each
   run holds a value >= it); then, among the groups whose maximum reaches it (about 100 of 288 at the shape
   above), the k-th largest group maximum (k groups each hold a value >= it).
3. The values >= tau of the groups whose maximum reaches tau (about k groups, k + 2 values), each as one 64-bit
   integer, key * 2^32 + (2^32 - 1 - position), so that equal values rank the lower position first; then the k
   largest of these, by dropping the smallest few (Hoare's selection where more than 4 are to go).
A row of fewer than k groups goes to step 3 with all its values. float64 rows, whose keys fill 64 bits, are left
to `torch.topk`.

The kernel runs on the calling thread. Split over two threads it took 7 ms at the shape above, but a second thread
shares its core with torch's OpenMP worker, which spins for milliseconds after every torch operation (the split took
15 ms right after a matrix product); numba's parallel loops bring a second OpenMP runtime that spins likewise after
the kernel, slowing the torch operations that follow; and run as a parallel region of torch's own runtime (its
`GOMP_parallel`), the split took 7-8 ms but the float32 product after it ran 8-10 ms slower.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch
from numba import extending, types
from torch import Tensor

GROUP = 16
"""Values per group (see the module's docstring); read when the kernel is compiled."""

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
"""The dtypes the kernel takes, each with the integer dtype of its width that its bits are read as."""

_LOW = np.int64(0xFFFFFFFF)


def topk_rows(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of z [B, n] and their positions: values [B, k] (gathered from z, so
    differentiable where z is) and indices [B, k] int64, in no particular order.

    The same entries as `z.topk(k, dim=1, sorted=False)`, NaN ranking above every number, except among equal
    values, where the lower position is kept (`torch.topk` leaves that open; -0.0 ranks below +0.0). On a CPU, for
    float32 and bfloat16, by this module's kernel on the calling thread (without the GIL); on another device or
    dtype, by `torch.topk`.
    """
    cpu_kernel = z.device.type == "cpu" and z.dtype in _BITS and z.ndim == 2 and z.shape[1] < 2**31
    if not cpu_kernel or not 0 < k <= z.shape[1] or z.shape[0] == 0:
        values, indices = z.topk(k, dim=-1, sorted=False)
        return values, indices
    indices = torch.empty(z.shape[0], k, dtype=torch.int64)
    _topk_kernel(z.detach().contiguous().view(_BITS[z.dtype]).numpy(), k, indices.numpy())
    return z.gather(1, indices), indices


def _key(b: Any) -> Any:
    """The bits b of a float, read as a signed integer of its width -> an int32 that orders as the float does, NaN
    above +inf (compiled only: see the overload below)."""
    raise NotImplementedError("_key runs compiled, inside numba kernels")


@extending.overload(_key)
def _key_of_width(b: Any) -> Any:
    # Constants are typed int32: numba would otherwise widen the arithmetic to int64, and step 1 vectorise less.
    if b == types.int16:

        def key16(b: Any) -> Any:
            v = np.int32(b)
            low = np.int32(0x7FFF)
            return low if (v & low) > np.int32(0x7F80) else v ^ ((v >> np.int32(15)) & low)

        return key16
    if b == types.int32:

        def key32(b: Any) -> Any:
            low = np.int32(0x7FFFFFFF)
            return low if (b & low) > np.int32(0x7F800000) else b ^ ((b >> np.int32(31)) & low)

        return key32
    return None


@numba.njit(inline="always")
def _select(a: Any, m: Any, k: Any) -> None:
    """Reorder a[:m] so that a[m - k:m] are its k largest (Hoare's FIND: a[m - k] is then the (m - k)-th smallest,
    with nothing larger before it and nothing smaller after it)."""
    target = m - k
    lo, hi = 0, m - 1
    while lo < hi:
        pivot = a[(lo + hi) >> 1]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while pivot < a[j]:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if j < target:
            lo = i
        if target < i:
            hi = j


@numba.njit(inline="always")
def _drop_smallest(a: Any, m: Any, k: Any) -> None:
    """Reorder a[:m] so that a[m - k:m] are its k largest: by moving the smallest to the front m - k times where
    that is few (step 3 usually finds k + 2 values), else by `_select`."""
    if m - k > 4:
        _select(a, m, k)
        return
    for front in range(m - k):
        least = front
        for j in range(front + 1, m):
            if a[j] < a[least]:
                least = j
        a[front], a[least] = a[least], a[front]


@numba.njit(inline="always")
def _packed(key: Any, position: Any) -> Any:
    """key and position as one int64 that orders by key, then by the lower position."""
    return (np.int64(key) << 32) | (_LOW - position)


@numba.njit(nogil=True, boundscheck=False, cache=True)
def _topk_kernel(bits: Any, k: Any, out: Any) -> None:  # pragma: no cover - runs compiled
    """out[r] <- the positions of the k largest of row r of bits [B, n] (floats' bits as integers); the steps are
    those of the module's docstring. One thread, without the GIL."""
    n_rows, n = bits.shape
    n_groups = (n + GROUP - 1) // GROUP
    packed = np.empty(n, np.int64)
    gmax = np.empty(n_groups, np.int32)
    groups = np.empty(n_groups, np.int32)
    maxima = np.empty(n_groups, np.int32)
    for r in range(n_rows):
        row = bits[r]
        if n_groups < k:
            for j in range(n):
                packed[j] = _packed(_key(row[j]), j)
            _select(packed, n, k)
            for j in range(k):
                out[r, j] = _LOW - (packed[n - k + j] & _LOW)
            continue
        for g in range(n_groups):  # step 1
            gmax[g] = _key(row[g])
        for s in range(1, GROUP):
            base = s * n_groups
            for g in range(min(n_groups, n - base)):
                gmax[g] = max(gmax[g], _key(row[base + g]))
        tau = gmax[0]  # step 2: the least maximum of k runs of groups
        for s in range(k):
            first = s * n_groups // k
            run_max = gmax[first]
            for g in range(first + 1, (s + 1) * n_groups // k):
                run_max = max(run_max, gmax[g])
            tau = run_max if s == 0 else min(tau, run_max)
        n_reach = 0  # the groups reaching it, and then the k-th largest of their maxima
        for g in range(n_groups):
            groups[n_reach] = g
            maxima[n_reach] = gmax[g]
            n_reach += gmax[g] >= tau
        _select(maxima, n_reach, k)
        tau = maxima[n_reach - k]
        m = 0  # step 3
        for q in range(n_reach):
            g = groups[q]
            if gmax[g] >= tau:
                for j in range(g, n, n_groups):
                    key = _key(row[j])
                    packed[m] = _packed(key, j)
                    m += key >= tau
        _drop_smallest(packed, m, k)
        for j in range(k):
            out[r, j] = _LOW - (packed[m - k + j] & _LOW)
