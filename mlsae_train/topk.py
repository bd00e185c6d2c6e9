"""Exact top-k of each row of a CPU tensor, for the TopK encoder (k of n latents per row, k much smaller than n),
as a numba kernel. Why by hand: `torch.topk` on a CPU costs about as much as the encoder's bf16 product (21-24 ms
on 2 threads against 24-27 ms at B 4,096, n 4,608, k 32), and no library offers a faster exact selection; this
kernel takes 4.6-5.7 ms there on 2 threads (8.6-10.7 ms on one), in bfloat16 and in float32.

How a row is selected. Values are compared as integers: a float's bits b (w of them, read as a signed integer),
with the bits below the sign flipped where the sign is set, b ^ ((b >> (w - 1)) & (2^(w-1) - 1)), order as the
floats do; NaN, of either sign, is mapped above +inf, as `torch.topk` ranks NaN largest. The row's n positions are
dealt into G = ceil(n / GROUP) groups, group g holding positions g, g + G, g + 2G, ...
1. Each group's maximum: a running maximum over the row's stripes of G values, which vectorises.
2. A lower bound tau of the row's k-th largest value: the least of the maxima of k disjoint runs of groups (each
   run holds a value >= it); then, among the groups whose maximum reaches it (about 100 of 288 at the shape
   above), the k-th largest group maximum (k groups each hold a value >= it), by a binary search over the keys.
3. The values >= tau of the groups whose maximum reaches tau (about k groups, k + 2 values), each as one 64-bit
   integer, key * 2^32 + (2^32 - 1 - position), so that equal values rank the lower position first; then the k
   largest of these, by dropping the smallest few (Hoare's selection where more than 4 are to go).
A row of fewer than k groups goes to step 3 with all its values. float64 rows, whose keys fill 64 bits, are left
to `torch.topk`.

Rows are split among torch's intra-op threads: the kernel runs, in parts of at least MIN_PART_ROWS rows, as a
parallel region of the OpenMP runtime torch itself runs on (`_torch_openmp`), whose workers, still spinning after
torch's last operation, take it up at once. The region's body is a C function compiled by numba (`_region_body`), so
the workers never enter Python. Where that runtime is not found (another platform, a torch built without OpenMP), or
the rows are few, the kernel runs on the calling thread. Why not threads of our own: they share the cores with
torch's OpenMP workers, which spin for milliseconds after every torch operation (a split over a second Python thread
took 15 ms right after a matrix product); numba's parallel loops bring a second OpenMP runtime that spins likewise
after the kernel, slowing the torch operations that follow; and a region whose body was a Python function (ctypes),
which each worker entered Python to run, took 7-8 ms but left the float32 product after it 8-10 ms slower (for a
reason not found); with the compiled body a whole float32 training step took 137 against 144 ms with the kernel on
one thread.
"""

from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import carray, extending, types
from torch import Tensor

GROUP = 16
"""Values per group (see the module's docstring); read when the kernel is compiled."""

MIN_PART_ROWS = 64
"""Rows are split among torch's threads in parts of at least this many rows (fewer rows: one thread)."""

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
"""The dtypes the kernel takes, each with the integer dtype of its width that its bits are read as."""

_LOW = np.int64(0xFFFFFFFF)


def topk_rows(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of z [B, n] and their positions: values [B, k] (differentiable where z is)
    and indices [B, k] int64, in no particular order.

    The same entries as `z.topk(k, dim=1, sorted=False)`, NaN ranking above every number, except among equal
    values, where the lower position is kept (`torch.topk` leaves that open; -0.0 ranks below +0.0). On a CPU, for
    float32 and bfloat16, by this module's kernel on torch's intra-op threads (see the module's docstring), without
    the GIL; on another device or dtype, by `torch.topk`. The result does not depend on the number of threads.
    """
    cpu_kernel = z.device.type == "cpu" and z.dtype in _BITS and z.ndim == 2 and z.shape[1] < 2**31
    if not cpu_kernel or not 0 < k <= z.shape[1] or z.shape[0] == 0:
        values, indices = z.topk(k, dim=-1, sorted=False)
        return values, indices
    as_int = _BITS[z.dtype]
    indices, top = torch.empty(z.shape[0], k, dtype=torch.int64), torch.empty(z.shape[0], k, dtype=z.dtype)
    _select_rows(z.detach().contiguous().view(as_int).numpy(), k, indices.numpy(), top.view(as_int).numpy())
    # the kernel's copies of the values, unless a graph needs them gathered from z (0.5 ms less at the shape above)
    return (z.gather(1, indices) if z.requires_grad else top), indices


def _select_rows(bits: np.ndarray, k: int, out: np.ndarray, top: np.ndarray) -> None:
    """out[r] <- the positions of the k largest of row r of bits [B, n], top[r] <- their bits (C-contiguous, as `out`
    and `top` [B, k]): in a parallel region of torch's OpenMP runtime, each of its threads taking parts of the rows,
    where there are rows for two parts and the runtime is found; else on this thread."""
    n_parts = min(torch.get_num_threads(), bits.shape[0] // MIN_PART_ROWS)
    openmp = _torch_openmp() if n_parts > 1 else None
    if openmp is None:
        _topk_kernel(bits, k, out, top)
        return
    # what the region's body reads (see `_region_body`)
    fns = (ctypes.cast(f, ctypes.c_void_p).value for f in (openmp.omp_get_thread_num, openmp.omp_get_num_threads))
    params = np.array([bits.ctypes.data, out.ctypes.data, top.ctypes.data, *bits.shape, k, n_parts, *fns], np.int64)
    openmp.GOMP_parallel(_region_body(bits.dtype.itemsize).address, params.ctypes.data, n_parts, 0)


@functools.cache
def _torch_openmp() -> Any:
    """The GNU OpenMP runtime (libgomp) that torch runs its intra-op threads on, through ctypes; None where torch
    runs on none, or where that library cannot be told apart (none, or several, mapped into this process).

    `GOMP_parallel(body, data, n_threads, flags)` is its C entry point for a parallel region, the one GCC compiles
    `#pragma omp parallel` to: the calling thread and n_threads - 1 of the runtime's workers each run body(data).
    """
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return None
    paths = set(re.findall(r"(/\S*/libgomp[^/\s]*\.so[^/\s]*)$", maps, re.MULTILINE))
    if len(paths) != 1:
        return None
    try:
        openmp = ctypes.CDLL(paths.pop())  # already loaded: the same library, not a second copy
        openmp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        openmp.GOMP_parallel.restype = None
        for name in ("omp_get_thread_num", "omp_get_num_threads"):
            getattr(openmp, name).argtypes = []
            getattr(openmp, name).restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return openmp


@functools.cache
def _region_body(width: int) -> Any:
    """The parallel region's body for keys of `width` bytes (2: bfloat16, 4: float32): a C function void (int64 *),
    compiled by numba on first use (and cached on disk). Its argument, params: the addresses of bits, out and top,
    B, n, k, the number of parts, and the addresses of the runtime's omp_get_thread_num and omp_get_num_threads;
    the thread of number t of T runs the kernel on parts t, t + T, ... of the rows."""
    return numba.cfunc(types.void(types.CPointer(types.int64)), cache=True)(_body16 if width == 2 else _body32)


def _pointer_to(item: Any) -> Any:
    """A compiled function: an address (int64) -> a pointer to `item`s there."""

    @extending.intrinsic
    def to_pointer(typingctx: Any, address: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(item)))

        return types.CPointer(item)(types.int64), codegen

    return to_pointer


_int16_at, _int32_at, _int64_at = _pointer_to(types.int16), _pointer_to(types.int32), _pointer_to(types.int64)


def _typed_call_int(typingctx: Any, address: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        function = ir.FunctionType(ir.IntType(32), [])
        return builder.call(builder.inttoptr(args[0], function.as_pointer()), [])

    return types.int32(types.int64), codegen


_call_int: Any = extending.intrinsic(_typed_call_int)
"""A compiled function: calls the C function int (void) at an address (int64), returns its int."""


@numba.njit(inline="always")
def _run_parts(p: Any, bits: Any, out: Any, top: Any) -> None:  # pragma: no cover - runs compiled
    n_rows, k, n_parts = p[3], p[5], p[6]
    for part in range(_call_int(p[7]), n_parts, _call_int(p[8])):
        first, end = n_rows * part // n_parts, n_rows * (part + 1) // n_parts
        _topk_kernel(bits[first:end], k, out[first:end], top[first:end])


def _body16(params: Any) -> None:  # pragma: no cover - runs compiled
    p = carray(params, 9)
    bits, top = carray(_int16_at(p[0]), (p[3], p[4])), carray(_int16_at(p[2]), (p[3], p[5]))
    _run_parts(p, bits, carray(_int64_at(p[1]), (p[3], p[5])), top)


def _body32(params: Any) -> None:  # pragma: no cover - runs compiled
    p = carray(params, 9)
    bits, top = carray(_int32_at(p[0]), (p[3], p[4])), carray(_int32_at(p[2]), (p[3], p[5]))
    _run_parts(p, bits, carray(_int64_at(p[1]), (p[3], p[5])), top)


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
def _kth_largest(a: Any, m: Any, k: Any, low: Any) -> Any:
    """The k-th largest of a[:m] (int32 keys, k <= m), given `low`, a value at most that: a binary search over the
    keys between `low` and the largest, counting the values that reach each midpoint, a loop that vectorises (the
    whole kernel took 8.5-8.9 against 12.2-12.6 ms with Hoare's selection, bf16, one thread, at the module's shape)."""
    lo, hi = np.int64(low), np.int64(low)  # invariant: at least k values reach lo, fewer than k reach hi
    for q in range(m):
        hi = max(hi, np.int64(a[q]))
    hi += 1
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        count = 0
        for q in range(m):
            count += a[q] >= mid
        if count >= k:
            lo = mid
        else:
            hi = mid
    return np.int32(lo)


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
def _topk_kernel(bits: Any, k: Any, out: Any, top: Any) -> None:  # pragma: no cover - runs compiled
    """out[r] <- the positions of the k largest of row r of bits [B, n] (floats' bits as integers), top[r] <- their
    bits; the steps are those of the module's docstring. One thread, without the GIL."""
    n_rows, n = bits.shape
    n_groups = (n + GROUP - 1) // GROUP
    packed = np.empty(n, np.int64)
    gmax = np.empty(n_groups, np.int32)
    groups = np.empty(n_groups, np.int32)
    maxima = np.empty(n_groups, np.int32)
    runs = np.empty(k + 1, np.int64)  # run s of step 2 spans groups runs[s]:runs[s + 1] (divisions once, not per row)
    for s in range(k + 1):
        runs[s] = s * n_groups // k
    for r in range(n_rows):
        row = bits[r]
        if n_groups < k:
            for j in range(n):
                packed[j] = _packed(_key(row[j]), j)
            _select(packed, n, k)
            for j in range(k):
                out[r, j] = _LOW - (packed[n - k + j] & _LOW)
                top[r, j] = row[out[r, j]]
            continue
        for g in range(n_groups):  # step 1
            gmax[g] = _key(row[g])
        for s in range(1, GROUP):
            base = s * n_groups
            for g in range(min(n_groups, n - base)):
                gmax[g] = max(gmax[g], _key(row[base + g]))
        tau = gmax[0]  # step 2: the least maximum of k runs of groups
        for s in range(k):
            run_max = gmax[runs[s]]
            for g in range(runs[s] + 1, runs[s + 1]):
                run_max = max(run_max, gmax[g])
            tau = run_max if s == 0 else min(tau, run_max)
        n_reach = 0  # the groups reaching it, and then the k-th largest of their maxima
        for g in range(n_groups):
            groups[n_reach] = g
            maxima[n_reach] = gmax[g]
            n_reach += gmax[g] >= tau
        tau = _kth_largest(maxima, n_reach, k, tau)
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
            top[r, j] = row[out[r, j]]
