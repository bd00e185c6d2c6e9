"""Keep freed memory inside the process while a command computes on a CPU, so each step reuses the pages of the last.

PyTorch allocates CPU tensors with the C library's malloc. glibc's malloc serves a large request (above a
threshold that grows to 32 MB at most) with a fresh mapping from the kernel and unmaps it when the tensor is freed,
and it returns free memory at the top of its heap to the kernel as well. A training step allocates the same large
tensors every time ([B, n] pre-activations, 75 MB at B 4,096 and n 4,608 in float32; gradients and Adam's
temporaries of [n, d]), so every step pays a page fault for each of their pages again: measured on 2 cores at that
shape, the step ran 381-394 ms against 387-458 ms, on one thread. `keep_freed_memory` turns both off with glibc's
`mallopt`, for the rest of the process: memory once used stays with the process (its peak resident memory is
unchanged; it no longer shrinks between steps). A transformer's forward pass allocates alike, layer after layer:
SmolLM2-135M's shape on 8 x 256 tokens took 5.16 s of one thread's CPU time against 5.65 s. Harvest, fit, sweep,
encode and eval call it when they compute on the CPU.

Why by hand: the usual cure, jemalloc or tcmalloc, must be preloaded (LD_PRELOAD) before the process starts and
installed beside Python; glibc's own switch is one call from inside the process. Elsewhere (not Linux, or a C
library without `mallopt`, such as musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import sys

import torch

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h: the free memory at the heap's top above which it is given back
_M_MMAP_MAX = -4  # the number of requests served by fresh mappings at once (0: none, all from the heap)
_TRIM_NEVER = 2**31 - 1  # the largest value the int parameter takes: 2 GiB


def keep_freed_memory(device: torch.device | str = "cpu") -> bool:
    """When `device` is the CPU, ask glibc to serve every allocation from its heap and never to shrink the heap;
    True where it took."""
    if torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
