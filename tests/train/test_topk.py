"""The encoder's row-wise top-k kernel (mlsae_train/topk.py) against a slow reference and against torch.topk."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mlsae_train import topk
from mlsae_train.topk import GROUP, MIN_PART_ROWS, topk_rows
from tests.helpers import per_thread_count

DTYPES = [torch.float32, torch.bfloat16]


def reference(z: torch.Tensor, k: int) -> np.ndarray:
    """The positions of each row's k largest values by a full sort: NaN first, then larger values, +0.0 above
    -0.0, then the lower position; [B, k] sorted increasingly."""
    x = z.double().numpy()
    out = []
    for row in x:
        positions = np.arange(row.size)
        nan = np.isnan(row)
        value = np.where(nan, 0.0, row)
        # np.lexsort sorts by its last key first, increasingly
        order = np.lexsort((positions, np.signbit(value), -value, ~nan))
        out.append(np.sort(order[:k]))
    return np.asarray(out)


def awkward_rows(dtype: torch.dtype, n_rows: int, n: int, seed: int) -> torch.Tensor:
    """Random rows, and rows of ties, infinities, NaN of either sign and signed zeros."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_rows, n, generator=gen, dtype=torch.float64).to(dtype)
    z[0] = 0.5  # every value tied
    if n_rows > 1:
        z[1, :: max(1, n // 7)] = z[1].max()  # the maximum several times
    if n_rows > 2:
        z[2, 3 % n] = float("nan")
        z[2, -1] = float("nan")
        z[2, 1 % n] = float("inf")
        z[2, 2 % n] = -float("inf")
    if n_rows > 3:
        z[3] = torch.where(torch.arange(n) % 2 == 0, 0.0, -0.0).to(dtype)
        z[3, n // 2] = 1.0
    if n_rows > 4:  # values of bf16's coarse grid: many ties among the largest
        z[4] = (z[4].double() * 4).round() / 4
    return z


def negative_nan_bits(z: torch.Tensor, position: tuple[int, int]) -> None:
    """Set z[position] to a NaN with its sign bit set (x86's default NaN), which `-float('nan')` does not always
    give."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[z.dtype]
    width = torch.iinfo(bits).bits
    z.view(bits)[position] = -(1 << (width - 1)) | ((1 << (width - 1)) - 1)  # sign, all exponent and mantissa bits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n", "k"),
    [
        (14, 2),  # fewer groups than k: the heap alone
        (100, 32),  # the same
        (40 * GROUP + 3, 32),  # groups, the last stripe short
        (4608, 32),  # the encoder's shape
        (33, 33),  # k = n
        (1000, 1),
        (37, 5),
    ],
)
def test_topk_rows_matches_a_full_sort(dtype: torch.dtype, n: int, k: int) -> None:
    z = awkward_rows(dtype, 9, n, seed=n + k)
    if n > 4:
        negative_nan_bits(z, (2, 4))
    values, indices = topk_rows(z, k)
    assert indices.dtype == torch.int64 and indices.shape == (9, k) and values.dtype == dtype
    np.testing.assert_array_equal(np.sort(indices.numpy(), axis=1), reference(z, k))
    torch.testing.assert_close(values, z.gather(1, indices), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_rows_selects_what_torch_topk_selects(dtype: torch.dtype) -> None:
    """Continuous random rows have no ties in float32, so both select the same positions; in bfloat16 the values
    agree (ties may pick different positions of the same value)."""
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(1024, 4608, generator=gen) + torch.randn(1, 4608, generator=gen)).to(dtype)
    values, indices = topk_rows(z, 32)
    want_values, want_indices = z.topk(32, dim=1, sorted=False)
    torch.testing.assert_close(values.sort(1).values, want_values.sort(1).values, rtol=0, atol=0)
    if dtype != torch.bfloat16:
        assert torch.equal(indices.sort(1).values, want_indices.sort(1).values)


@pytest.mark.parametrize("n_rows", [2 * MIN_PART_ROWS - 1, 2 * MIN_PART_ROWS, 257])
def test_topk_rows_does_not_depend_on_threads(n_rows: int) -> None:
    """One thread, or parts of the rows on 2 and 3 of torch's threads (fewer than 2 * MIN_PART_ROWS rows: one)."""
    z = awkward_rows(torch.bfloat16, n_rows, 4608, seed=5)
    results = per_thread_count(lambda: topk_rows(z, 32)[1])
    np.testing.assert_array_equal(np.sort(results[0].numpy(), axis=1), reference(z, 32))
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="torch runs its threads on OpenMP's GNU runtime on Linux only",
)
def test_topk_rows_runs_on_torchs_openmp_threads_where_torch_does() -> None:
    """The parallel path is found (a torch wheel for Linux ships GNU libgomp), and equals the calling thread's."""
    assert topk._torch_openmp() is not None
    z = awkward_rows(torch.float32, 300, 1000, seed=7)
    want, want_top = torch.empty(300, 9, dtype=torch.int64), torch.empty(300, 9)
    topk._topk_kernel(z.view(torch.int32).numpy(), 9, want.numpy(), want_top.view(torch.int32).numpy())
    values, indices = per_thread_count(lambda: topk_rows(z, 9), counts=(2,))[0]
    assert torch.equal(indices, want) and torch.equal(values.view(torch.int32), want_top.view(torch.int32))


def test_topk_rows_without_the_openmp_runtime_runs_on_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    z = awkward_rows(torch.float32, 300, 1000, seed=8)
    want = topk_rows(z, 9)[1]
    monkeypatch.setattr(topk, "_torch_openmp", lambda: None)
    assert torch.equal(per_thread_count(lambda: topk_rows(z, 9)[1], counts=(2,))[0], want)


def test_topk_rows_is_the_same_from_several_threads_at_once() -> None:
    """The kernel runs without the GIL, with scratch arrays of its own per call, each calling thread with a team of
    OpenMP threads of its own: several Python threads may select at once (the explorer's server does)."""
    z = awkward_rows(torch.float32, 1000, 4608, seed=6)
    want = topk_rows(z, 32)[1]
    np.testing.assert_array_equal(np.sort(want.numpy(), axis=1), reference(z, 32))
    with ThreadPoolExecutor(4) as pool:
        for got in pool.map(lambda _: topk_rows(z, 32)[1], range(8)):
            assert torch.equal(got, want)


def test_topk_rows_values_are_differentiable_and_strided_input_is_read() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(700, 6, generator=gen).T.requires_grad_()  # [6, 700], not contiguous
    values, indices = topk_rows(z, 8)
    np.testing.assert_array_equal(np.sort(indices.numpy(), axis=1), reference(z.detach(), 8))
    values.sum().backward()
    assert z.grad is not None
    want = torch.zeros(6, 700).scatter_(1, indices, 1.0)
    assert torch.equal(z.grad, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int32])
def test_topk_rows_leaves_other_dtypes_to_torch_topk(dtype: torch.dtype) -> None:
    z = torch.randperm(600).reshape(2, 300).to(dtype)
    values, indices = topk_rows(z, 4)
    want_values, want_indices = z.topk(4, dim=1, sorted=False)
    assert torch.equal(values, want_values) and torch.equal(indices, want_indices)
