"""Exact top-k of each row of a CPU tensor, for the TopK encoder (k of n latents per row, k much smaller than n),
as a numba kernel. Why by hand: `torch.topk` on a CPU costs about as much as the encoder's bf16 product (21-24 ms
on 2 threads against 24-27 ms at B 4,096, n 4,608, k 32), and no library offers a faster exact selection; this
kernel takes 7 ms there on 2 threads (14-15 ms on one), in float32 and in bfloat16.

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

Rows are split among torch's threads and selected in a parallel region of torch's own OpenMP runtime (see
`_torch_openmp`): 7 ms at the shape above on 2 threads. Threads of our own, or numba's parallel loops (which bring a
second OpenMP runtime), would share the cores with torch's OpenMP workers, which spin for milliseconds after every
torch operation; where torch's runtime is not found, the kernel runs on the calling thread.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from numba import extending, types
from torch import Tensor

GROUP = 16
"""Values per group (see the module's docstring); read when the kernel is compiled."""

MIN_PART_ROWS = 64
"""Rows are split among torch's threads in parts of at least this many rows."""


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
"""The dtypes the kernel takes, each with the integer dtype of its width that its bits are read as."""

_LOW = np.int64(0xFFFFFFFF)


def topk_rows(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of z [B, n] and their positions: values [B, k] (gathered from z, so
    differentiable where z is) and indices [B, k] int64, in no particular order.

    The same entries as `z.topk(k, dim=1, sorted=False)`, NaN ranking above every number, except among equal
    values, where the lower position is kept (`torch.topk` leaves that open; -0.0 ranks below +0.0). On a CPU, for
    float32 and bfloat16, by this module's kernel on torch's threads; on another device or dtype, by `torch.topk`.
    Safe to call from several threads at once.
    """
    cpu_kernel = z.device.type == "cpu" and z.dtype in _BITS and z.ndim == 2 and z.shape[1] < 2**31
    if not cpu_kernel or not 0 < k <= z.shape[1] or z.shape[0] == 0:
        values, indices = z.topk(k, dim=-1, sorted=False)
        return values, indices
    indices = torch.empty(z.shape[0], k, dtype=torch.int64)
    _select_rows(z.detach().contiguous().view(_BITS[z.dtype]).numpy(), k, indices.numpy())
    return z.gather(1, indices), indices


def _select_rows(bits: np.ndarray, k: int, out: np.ndarray) -> None:
    """The kernel over the rows of bits [B, n], in parts of at least MIN_PART_ROWS rows run by torch's own OpenMP
    threads where `_torch_openmp` finds them (each thread takes parts until none is left), else on this thread."""
    n_parts = min(torch.get_num_threads(), bits.shape[0] // MIN_PART_ROWS)
    openmp = _torch_openmp()
    if n_parts < 2 or openmp is None:
        _topk_kernel(bits, k, out)
        return
    bounds = [bits.shape[0] * p // n_parts for p in range(n_parts + 1)]
    done = [False] * n_parts
    errors: list[BaseException] = []

    def parts(_: Any) -> None:
        try:
            for p in range(openmp.omp_get_thread_num(), n_parts, openmp.omp_get_num_threads()):
                _topk_kernel(bits[bounds[p] : bounds[p + 1]], k, out[bounds[p] : bounds[p + 1]])
                done[p] = True
        except BaseException as error:  # raised again below, on the calling thread
            errors.append(error)

    callback = _REGION(parts)
    openmp.GOMP_parallel(ctypes.cast(callback, ctypes.c_void_p), None, n_parts, 0)
    if errors:
        raise errors[0]
    if not all(done):
        raise RuntimeError(f"top-k: {done.count(False)} of {n_parts} parts of the rows were not selected")


_REGION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
"""The C type of an OpenMP parallel region's body, void (*)(void *)."""


@functools.cache
def _torch_openmp() -> Any:
    """torch's own OpenMP runtime (ctypes), where it is the GNU libgomp its Linux wheels ship; else None.

    Why: the kernel splits its rows among threads, and threads of its own would share the cores with torch's
    OpenMP workers, which spin for milliseconds after every torch operation (measured: 15 against 7 ms for the
    split right after a matrix product); run as a parallel region of torch's runtime, its parts go to those very
    workers (7 ms, whatever ran before). `GOMP_parallel(fn, data, n_threads, flags)` is the runtime's C entry point
    for a parallel region, the one GCC compiles `#pragma omp parallel` to.
    """
    path = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not path.is_file() or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        openmp = ctypes.CDLL(str(path))  # already loaded by torch: the same library
        openmp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        openmp.GOMP_parallel.restype = None
        openmp.omp_get_thread_num.restype = ctypes.c_int
        openmp.omp_get_num_threads.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return openmp


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
    those of the module's docstring. Runs without the GIL."""
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
