"""A Triton sparse decoder for CUDA: the same autograd function as `sae._SparseDecode`, in three kernels.

Notation as in sae.py: B rows, d = d_model, n = n_latents, m active latents per row (k, or k_aux for AuxK).
Inputs values [B, m] float, indices [B, m] int64 in [0, n), weight W [n, d] float; output y [B, d].

    forward        y[b]        = sum_j values[b, j] W[indices[b, j]]           one program per (row, d-block)
    grad values    gv[b, j]    = <g[b], W[indices[b, j]]>                      one program per (row, m-block)
    grad weight    gW[i]       = sum_{(b, j): indices[b, j] = i} values[b, j] g[b]    one program per (latent, d-block)

None of them forms the dense [B, n] matrix. The weight gradient is a reduction per latent over the (row, slot)
pairs that selected it. Scattering each pair's contribution with atomic adds would need no sort, but float
atomics add in whatever order the threads arrive, so two runs would differ in the last bits. Instead the flat
indices are sorted (stable) into a CSC layout (`sparse_layout`), latent i owning the positions crow[i]:crow[i + 1]
of `order` in increasing (row, slot) order, and each program sums its latent's pairs in that fixed order: the
result is deterministic and no memory location is written twice. The sort (torch.sort of B * m int32 keys on
a GPU, a counting sort on a CPU) is the price; it is the layout the eager backward uses for its sparse products,
and the encoder's, built once a step and handed to whichever decoder runs. A latent chosen by many rows is summed
by one program (a long loop, 16 pairs at a time); a dead latent's program writes zeros.

Every kernel loads its inputs in their own dtype, accumulates in float32 and stores in the output's dtype
(y and gW in W's dtype, gv in values's dtype). triton is imported guardedly: without it this module still
imports, `triton_available` is False and `resolve_decoder_kernel` picks (or asks for) the eager decoder.
Setting TRITON_INTERPRET=1 before this module is first imported runs the kernels on CPU tensors in Triton's
interpreter (how the tests check them without a GPU).
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal, NamedTuple, get_args

import numba
import torch
from torch import Tensor

from mlsae_cache.core.errors import InputError

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager decoder serves every device
    triton = None

DecoderKernel = Literal["auto", "triton", "eager"]
"""Which sparse decoder runs: `auto` is Triton on a CUDA device when triton is installed, eager otherwise."""
DECODER_KERNELS: tuple[str, ...] = get_args(DecoderKernel)

_MIN_CAPABILITY = (7, 0)  # what torch's own Triton backend (inductor) asks of a CUDA device
# Tiles of 16 x 128 elements: 50-94 registers a thread (4 warps, sm_90, no spills) where 32 x 128 took up to
# 167, as ptxas reports for kernels compiled without a GPU. Their speed on a GPU is not measured yet.
_BLOCK_D = 128  # d_model columns per program (forward, grad weight) or per loop step (grad values)
_BLOCK_M = 16  # active latents per loop step (forward) or per program (grad values)
_BLOCK_E = 16  # (row, slot) pairs of one latent per loop step (grad weight)
# Fused multiply-adds, triton's default through 3.9, asked for explicitly as 3.10 is to change the default.
_OPTIONS = {"enable_fp_fusion": True}


@functools.cache
def triton_available(device: torch.device | str) -> bool:
    """True when the Triton decoder can run on `device`: a CUDA device of compute capability >= 7.0 and an
    importable triton. Always False for CPU tensors (the interpreter is for tests; they call the kernels
    directly)."""
    device = torch.device(device)
    if triton is None or device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= _MIN_CAPABILITY


def resolve_decoder_kernel(kernel: DecoderKernel, device: torch.device | str) -> Literal["triton", "eager"]:
    """The decoder that runs for `kernel` on `device`; InputError when `triton` is asked for and cannot run."""
    if kernel not in DECODER_KERNELS:
        raise InputError(f"--decoder-kernel {kernel!r} is not one of {', '.join(DECODER_KERNELS)}")
    if kernel == "eager" or (kernel == "auto" and not triton_available(device)):
        return "eager"
    if kernel == "triton" and not triton_available(device):
        if triton is None:
            why = "the triton package is not installed (pip install triton)"
        elif torch.device(device).type != "cuda" or not torch.cuda.is_available():
            why = f"it runs on CUDA devices only, and the device is {torch.device(device)} (use --device cuda)"
        else:
            why = f"device {torch.device(device)} has compute capability below {_MIN_CAPABILITY[0]}.0"
        raise InputError(f"--decoder-kernel triton cannot run: {why}; or use --decoder-kernel auto or eager")
    return "triton"


def _block(size: int, cap: int) -> int:
    """A power-of-two block covering `size` up to `cap`, at least 16 (tl.arange wants a power of two)."""
    return max(16, min(cap, 1 << max(size - 1, 0).bit_length()))


class SparseLayout(NamedTuple):
    """The (row, slot) pairs of indices [B, m] in latent-major order: the CSR pattern of S^T [n, B], where S [B, n]
    has S[r, indices[r, j]] != 0. Built by `sparse_layout`, once per step in the encoder's forward (sae.py), for the
    sparse products of a training step's backward: both weight gradients and the decoder's SDDMM (eager), or the
    decoder's weight-gradient kernel (Triton).

    order: [B m] int64, the flat positions r m + j sorted by latent, stably (so each latent's rows increase).
    rows: [B m] int64, the row r of each position in `order` (S^T's column indices).
    crow: [n + 1] int64, latent i owning order[crow[i]:crow[i + 1]] (S^T's row offsets).
    """

    order: Tensor
    rows: Tensor
    crow: Tensor


def sparse_layout(indices: Tensor, n_latents: int) -> SparseLayout:
    """The latent-major layout of indices [B, m] int64 in [0, n_latents); see `SparseLayout`.

    On a CPU by a counting sort (`_latent_major`: 1.1 against 2.3 ms for a stable torch.sort and its bookkeeping, B
    4,096, m 32, n 4,608, 2 cores); elsewhere by `sorted_layout`. The same layout either way.
    """
    if indices.device.type != "cpu":
        return sorted_layout(indices, n_latents)
    b, m = indices.shape
    order, rows = (torch.empty(b * m, dtype=torch.int64) for _ in range(2))
    crow = torch.empty(n_latents + 1, dtype=torch.int64)
    if not _latent_major(indices.contiguous().numpy(), order.numpy(), rows.numpy(), crow.numpy()):
        raise InputError(f"latent ids outside [0, {n_latents}) (the SAE has {n_latents} latents)")
    return SparseLayout(order, rows, crow)


@numba.njit(nogil=True, boundscheck=False, cache=True)
def _latent_major(indices: Any, order: Any, rows: Any, crow: Any) -> bool:  # pragma: no cover - runs compiled
    """A counting sort: crow [n + 1] <- each latent's offset, order and rows [B m] <- the positions r m + j and rows
    r of indices [B, m], latent by latent, each latent's in increasing position. False (and no layout) where an id
    lies outside [0, n)."""
    n = crow.shape[0] - 1
    b, m = indices.shape
    crow[:] = 0
    for r in range(b):
        for j in range(m):
            latent = indices[r, j]
            if latent < 0 or latent >= n:
                return False
            crow[latent + 1] += 1
    for i in range(n):
        crow[i + 1] += crow[i]
    end = crow[:-1].copy()  # where each latent's next position goes
    for r in range(b):
        for j in range(m):
            latent = indices[r, j]
            order[end[latent]] = r * m + j
            rows[end[latent]] = r
            end[latent] += 1
    return True


def sorted_layout(indices: Tensor, n_latents: int) -> SparseLayout:
    """`sparse_layout` by torch operations on any device: a stable sort of the flat ids."""
    flat = indices.reshape(-1)
    # A stable sort keeps each latent's row ids increasing, as CSR column indices must be. int32 keys
    # sort faster than int64 ones (8 against 10 ms for 131k ids on 2 idle cores; 100 against 170 ms on
    # busy ones).
    keys = flat.to(torch.int32) if n_latents < 2**31 else flat
    order = torch.sort(keys, stable=True).indices
    rows = torch.div(order, max(indices.shape[1], 1), rounding_mode="floor")
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.cumsum(torch.bincount(flat, minlength=n_latents), 0)
    return SparseLayout(order, rows, crow)


if triton is not None:

    @triton.jit
    def _forward_kernel(
        values_ptr, indices_ptr, weight_ptr, out_ptr, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        """out[b, cols] = sum_j values[b, j] weight[indices[b, j], cols] for one row b and one block of cols."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for start in range(0, M, BLOCK_M):
            slots = start + tl.arange(0, BLOCK_M)
            slot_ok = slots < M
            latent = tl.load(indices_ptr + row * M + slots, mask=slot_ok, other=0)
            coef = tl.load(values_ptr + row * M + slots, mask=slot_ok, other=0.0).to(tl.float32)
            tile_ok = slot_ok[:, None] & col_ok[None, :]
            w = tl.load(weight_ptr + latent[:, None] * D + cols[None, :], mask=tile_ok, other=0.0)
            acc += tl.sum(coef[:, None] * w.to(tl.float32), axis=0)
        tl.store(out_ptr + row * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)

    @triton.jit
    def _grad_values_kernel(
        grad_ptr, indices_ptr, weight_ptr, out_ptr, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        """out[b, slots] = <grad[b], weight[indices[b, slots]]> for one row b and one block of slots."""
        row = tl.program_id(0).to(tl.int64)
        slots = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        slot_ok = slots < M
        latent = tl.load(indices_ptr + row * M + slots, mask=slot_ok, other=0)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            g = tl.load(grad_ptr + row * D + cols, mask=col_ok, other=0.0).to(tl.float32)
            tile_ok = slot_ok[:, None] & col_ok[None, :]
            w = tl.load(weight_ptr + latent[:, None] * D + cols[None, :], mask=tile_ok, other=0.0)
            acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
        tl.store(out_ptr + row * M + slots, acc.to(out_ptr.dtype.element_ty), mask=slot_ok)

    @triton.jit
    def _grad_weight_kernel(
        grad_ptr, values_ptr, order_ptr, offsets_ptr, out_ptr, M, D, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        """out[i, cols] = sum over latent i's (row, slot) pairs p = row * M + slot, listed in order[offsets[i]:
        offsets[i + 1]], of values[p] grad[row, cols]; summed in that order, so the result is deterministic."""
        latent = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        first = tl.load(offsets_ptr + latent)
        last = tl.load(offsets_ptr + latent + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for start in range(first, last, BLOCK_E):
            pairs = start + tl.arange(0, BLOCK_E)
            pair_ok = pairs < last
            flat = tl.load(order_ptr + pairs, mask=pair_ok, other=0).to(tl.int64)
            coef = tl.load(values_ptr + flat, mask=pair_ok, other=0.0).to(tl.float32)
            tile_ok = pair_ok[:, None] & col_ok[None, :]
            g = tl.load(grad_ptr + (flat // M)[:, None] * D + cols[None, :], mask=tile_ok, other=0.0)
            acc += tl.sum(coef[:, None] * g.to(tl.float32), axis=0)
        tl.store(out_ptr + latent * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _on_device(t: Tensor) -> AbstractContextManager[object]:
    """Launch on t's GPU (Triton launches on the current device); nothing to switch in the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def decode_forward(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """y [B, d] in weight's dtype from contiguous values [B, m], indices [B, m] int64 and weight [n, d]."""
    (b, m), d = values.shape, weight.shape[1]
    out = torch.empty(b, d, dtype=weight.dtype, device=weight.device)
    if b == 0 or m == 0:
        return out.zero_()
    block_d = _block(d, _BLOCK_D)
    with _on_device(weight):
        _forward_kernel[(b, triton.cdiv(d, block_d))](
            values, indices, weight, out, m, d, _block(m, _BLOCK_M), block_d, **_OPTIONS
        )
    return out


def decode_grad_values(grad: Tensor, indices: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """gv [B, m] in `dtype`, gv[b, j] = <grad[b], weight[indices[b, j]]>; all inputs contiguous."""
    b, m = indices.shape
    out = torch.empty(b, m, dtype=dtype, device=weight.device)
    if b == 0 or m == 0:
        return out.zero_()
    block_m = _block(m, _BLOCK_M)
    args = (grad, indices, weight, out, m, weight.shape[1], block_m, _block(weight.shape[1], _BLOCK_D))
    with _on_device(weight):
        _grad_values_kernel[(b, triton.cdiv(m, block_m))](*args, **_OPTIONS)
    return out


def decode_grad_weight(grad: Tensor, values: Tensor, layout: SparseLayout, weight: Tensor) -> Tensor:
    """gW [n, d] in weight's dtype, the sum over each latent's (row, slot) pairs of values * grad rows; `layout` is
    `sparse_layout(indices, n)`."""
    (n, d), m = weight.shape, values.shape[1]
    out = torch.empty(n, d, dtype=weight.dtype, device=weight.device)
    if values.numel() == 0:
        return out.zero_()
    order, offsets = layout.order, layout.crow
    block_d = _block(d, _BLOCK_D)
    with _on_device(weight):
        _grad_weight_kernel[(n, triton.cdiv(d, block_d))](
            grad, values, order, offsets, out, m, d, _BLOCK_E, block_d, **_OPTIONS
        )
    return out


class TritonSparseDecode(torch.autograd.Function):
    """y = sum_j values[:, j] weight[indices[:, j]] (no bias) with Triton kernels; see the module docstring.

    Shapes: values [B, m] float, indices [B, m] int64 in [0, n) (out-of-range ids are not checked, as in any
    gather kernel), weight [n, d] float -> y [B, d] in weight's dtype. Gradients for values and weight, in
    their dtypes. Repeated latents within a row are summed like any other pairs.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, values: Tensor, indices: Tensor, weight: Tensor, layout: SparseLayout | None = None
    ) -> Tensor:
        assert triton is not None, "TritonSparseDecode needs triton (resolve_decoder_kernel checks this)"
        assert values.ndim == 2 and values.shape == indices.shape and weight.ndim == 2, "values, indices [B, m]"
        assert indices.dtype == torch.int64, "int64 latent ids"
        values, indices, weight = values.contiguous(), indices.contiguous(), weight.contiguous()
        ctx.save_for_backward(values, indices, weight)
        ctx.layout = layout
        return decode_forward(values, indices, weight)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, None, Tensor | None, None]:
        values, indices, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = decode_grad_values(grad, indices, weight, values.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[2]:
            layout = ctx.layout if ctx.layout is not None else sparse_layout(indices, weight.shape[0])
            grad_weight = decode_grad_weight(grad, values, layout, weight)
        return grad_values, None, grad_weight, None
