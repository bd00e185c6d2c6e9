"""The Triton sparse decoder (kernels.py) against the eager `_SparseDecode` and a dense float64 autograd
reference; the choice between them (`--decoder-kernel`).

Without a GPU the kernels run on CPU tensors in Triton's interpreter. triton (3.9) reads TRITON_INTERPRET when
`triton.jit` decorates a kernel, i.e. when mlsae_train.kernels is first imported, so the interpreted checks run
in a subprocess that sets it before importing anything (`run_interpreted`): the variable never reaches this
process, where the kernels stay compiled-for-GPU objects that nothing launches. Tests marked `gpu` compare the
compiled kernels with the eager decoder on CUDA at a real SAE's shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mlsae_cache.core.errors import InputError
from mlsae_train import kernels, sae
from mlsae_train.cli import main
from mlsae_train.config import TrainConfig
from mlsae_train.kernels import (
    TritonSparseDecode,
    resolve_decoder_kernel,
    sorted_layout,
    sparse_layout,
    triton_available,
)
from mlsae_train.sae import SaeConfig, TopKSAE, _SparseDecode, sparse_decode

REPO = Path(__file__).resolve().parents[2]
# What the interpreter of triton 3.2-3.4 (3.9 is fine) raises for any loop with a runtime bound under numpy 2.4.
NUMPY_2_4_CLASH = "only 0-dimensional arrays can be converted to Python scalars"

# id: (rows B, n_latents, d_model, m latents per row, values dtype, weight dtype). Latent 0 is in every row when
# m > 1 (70 rows: five steps of the grad-weight kernel's 16-pair loop) and latent n - 1 in none (a zero gradient
# row); B is no multiple of any block, d 48, 50 (one masked 128-column block) and 200 (two), m 1, 4, 8 (masked
# 16-latent blocks) and 64 (four).
CASES = {
    "fp32-m1-d50": (37, 40, 50, 1, torch.float32, torch.float32),
    "fp32-m4-d48": (37, 40, 48, 4, torch.float32, torch.float32),
    "fp32-m64-d50": (70, 96, 50, 64, torch.float32, torch.float32),
    "fp32-m8-d200": (9, 24, 200, 8, torch.float32, torch.float32),
    "fp32-empty": (0, 8, 16, 4, torch.float32, torch.float32),
    "bf16-m4-d48": (37, 40, 48, 4, torch.bfloat16, torch.bfloat16),
    "bf16-m64-d50": (70, 96, 50, 64, torch.bfloat16, torch.bfloat16),
    "fp32-values-bf16-weight": (37, 40, 50, 4, torch.float32, torch.bfloat16),
}


def tolerance(*dtypes: torch.dtype) -> dict[str, float]:
    """float32: summation order only. bfloat16: the kernels sum in float32 and convert the sum to bfloat16 once;
    the interpreter's conversion truncates (under 2^-7 relative; compiled kernels round to nearest, 2^-8), hence
    rtol 2^-7, with atol for float32 sums that cancel to nearly 0."""
    if torch.bfloat16 in dtypes:
        return {"rtol": 2**-7, "atol": 1e-3}
    return {"rtol": 1e-5, "atol": 1e-5}


def make_inputs(
    b: int, n: int, d: int, m: int, v_dtype: torch.dtype, w_dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """values [B, m] in [0.1, 1.1), indices [B, m] distinct within a row, weight [n, d], grad_out [B, d]."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n - 1, generator=gen)[:m] for _ in range(b)]  # latent n - 1 is never chosen
    indices = torch.stack(rows) if rows else torch.zeros(0, m, dtype=torch.int64)
    if m > 1:  # latent 0 in every row: put it in slot 0 where the row lacks it
        lacks = ~(indices == 0).any(1)
        indices[lacks, 0] = 0
    values = (torch.rand(b, m, generator=gen) + 0.1).to(v_dtype)
    weight = torch.randn(n, d, generator=gen).to(w_dtype)
    grad_out = torch.randn(b, d, generator=gen).to(w_dtype)
    return values, indices, weight, grad_out


def forward_backward(
    decode: type[torch.autograd.Function],
    values: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, grad values, grad weight) of `decode`, for the output gradient g."""
    v, w = values.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y = decode.apply(v, indices, w)
    y.backward(g)
    return y.detach(), v.grad, w.grad


def dense_reference(
    values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slow reference: the dense [B, n] code matrix times weight, in float64, differentiated by autograd."""
    v, w = values.double().requires_grad_(), weight.double().requires_grad_()
    codes = torch.zeros(values.shape[0], weight.shape[0], dtype=torch.float64).scatter_add(1, indices, v)
    y = codes @ w
    y.backward(g.double())
    return y.detach(), v.grad, w.grad


def check_case(b: int, n: int, d: int, m: int, v_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    """Triton against the dense reference and against the eager decoder (on float32 copies of the inputs, as
    the eager decoder's sparse products have no bfloat16 CPU kernels); raises AssertionError on a mismatch."""
    values, indices, weight, g = make_inputs(b, n, d, m, v_dtype, w_dtype)
    got = forward_backward(TritonSparseDecode, values, indices, weight, g)
    dense = dense_reference(values, indices, weight, g)
    eager = forward_backward(_SparseDecode, values.float(), indices, weight.float(), g.float())
    tol = tolerance(v_dtype, w_dtype)
    for name, out, want_dense, want_eager, dtype in zip(
        ("y", "grad_values", "grad_weight"), got, dense, eager, (w_dtype, v_dtype, w_dtype), strict=True
    ):
        assert out.dtype == dtype, f"{name} is {out.dtype}, expected {dtype}"
        torch.testing.assert_close(out.double(), want_dense, **tol, msg=lambda s, name=name: f"{name} vs dense: {s}")
        torch.testing.assert_close(out.double(), want_eager.double(), **tol, msg=lambda s, name=name: f"{name}: {s}")
    assert b == 0 or not got[2][n - 1].any(), "an unchosen latent's gradient row is not zero"


def run_interpreted() -> dict[str, str | None]:
    """Every case of CASES in this process (meant to run under TRITON_INTERPRET=1): id -> None or the mismatch."""
    assert kernels.triton is not None and os.environ.get("TRITON_INTERPRET") == "1", "run me interpreted"
    results: dict[str, str | None] = {}
    for case_id, case in CASES.items():
        try:
            check_case(*case)
            results[case_id] = None
        except AssertionError as e:
            results[case_id] = str(e)
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str | None]:
    """The results of `run_interpreted` in a subprocess with TRITON_INTERPRET=1 (a few seconds on 2 cores)."""
    pytest.importorskip("triton")
    code = "import json, tests.train.test_kernels as t; print(json.dumps(t.run_interpreted()))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if NUMPY_2_4_CLASH in proc.stderr:
        pytest.skip(f"this triton's interpreter fails with numpy >= 2.4 ({NUMPY_2_4_CLASH}; triton-lang/triton#9171)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("case_id", list(CASES))
def test_interpreted_triton_matches_eager_and_dense(interpreted: dict[str, str | None], case_id: str) -> None:
    assert interpreted[case_id] is None, interpreted[case_id]


@pytest.fixture
def fresh_availability() -> object:
    """triton_available caches its answer per device; tests that fake the environment start and end afresh."""
    triton_available.cache_clear()
    yield
    triton_available.cache_clear()


@pytest.mark.parametrize(("rows", "m", "n"), [(4096, 32, 4608), (37, 5, 9), (1, 1, 1), (0, 3, 4), (6, 0, 4)])
def test_sparse_layout_is_the_latent_major_order_and_the_sorted_one(rows: int, m: int, n: int) -> None:
    """The CPU's counting sort against the definition (each latent's positions in increasing order), and against
    the stable sort that other devices run; ids may repeat within a row (AuxK's may not, but the layout allows it)."""
    gen = torch.Generator().manual_seed(rows + m + n)
    indices = torch.randint(0, n, (rows, m), generator=gen)
    got = sparse_layout(indices, n)
    flat = indices.reshape(-1).tolist()
    want_order = sorted(range(len(flat)), key=lambda e: flat[e])  # Python's sort is stable
    assert got.order.tolist() == want_order
    assert got.rows.tolist() == [e // max(m, 1) for e in want_order]
    counts = [0] * (n + 1)
    for i in flat:
        counts[i + 1] += 1
    assert got.crow.tolist() == [sum(counts[: latent + 1]) for latent in range(n + 1)]
    assert all(torch.equal(a, b) for a, b in zip(got, sorted_layout(indices, n), strict=True))


@pytest.mark.parametrize("bad", [-1, 9])
def test_sparse_layout_refuses_ids_outside_the_latents(bad: int) -> None:
    indices = torch.tensor([[0, 3], [bad, 2]])
    with pytest.raises(InputError, match=r"outside \[0, 9\)"):
        sparse_layout(indices, 9)


def test_auto_and_eager_pick_the_eager_decoder_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_decoder_kernel("auto", "cpu") == resolve_decoder_kernel("eager", "cpu") == "eager"
    assert not triton_available("cpu")

    def refuse(*args: object) -> None:
        raise AssertionError("the Triton decoder ran on CPU tensors")

    monkeypatch.setattr(sae.TritonSparseDecode, "apply", refuse)
    values, indices, weight, _ = make_inputs(5, 12, 8, 3, torch.float32, torch.float32)
    want = _SparseDecode.apply(values, indices, weight)
    assert torch.equal(sparse_decode(values, indices, weight), want)
    assert torch.equal(sparse_decode(values, indices, weight, "eager"), want)


def test_triton_on_cpu_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"--decoder-kernel triton cannot run: .*; or use --decoder-kernel auto"):
        resolve_decoder_kernel("triton", "cpu")
    model = TopKSAE(SaeConfig(8, 16, 2), decoder_kernel="triton")
    with pytest.raises(InputError, match="--decoder-kernel triton cannot run"):
        model(torch.randn(4, 8))


def test_without_triton_auto_is_eager_and_triton_says_to_install_it(
    monkeypatch: pytest.MonkeyPatch, fresh_availability: object
) -> None:
    monkeypatch.setattr(kernels, "triton", None)
    assert resolve_decoder_kernel("auto", "cuda") == "eager"
    with pytest.raises(InputError, match=r"triton package is not installed \(pip install triton\)"):
        resolve_decoder_kernel("triton", "cuda")


def test_an_unknown_kernel_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--decoder-kernel 'fast' is not one of auto, triton, eager"):
        TrainConfig(cache=tmp_path, out=tmp_path / "out", decoder_kernel="fast")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="is not one of"):
        resolve_decoder_kernel("fast", "cpu")  # type: ignore[arg-type]


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(main, ["--quiet", *args], catch_exceptions=False)


FIT_TINY = ["--device", "cpu", "--expansion-factor", "2", "--k", "4", "--batch-rows", "128", "--max-rows", "256"]


def test_fit_with_triton_on_cpu_exits_2_and_writes_nothing(tmp_path: Path, random_cache: Path) -> None:
    out = tmp_path / "out"
    result = invoke("fit", str(random_cache), str(out), *FIT_TINY, "--decoder-kernel", "triton")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error: --decoder-kernel triton cannot run") and result.stderr.count("\n") == 1
    assert not out.exists()


def test_fit_with_the_eager_kernel_trains_and_cfg_json_does_not_record_it(tmp_path: Path, random_cache: Path) -> None:
    """The kernel changes how the decoder is computed, not what: not a hyperparameter, so cfg.json (and a
    resume's comparison) leaves it out, and checkpoints written before the option existed load as before."""
    out = tmp_path / "out"
    result = invoke("fit", str(random_cache), str(out), *FIT_TINY, "--decoder-kernel", "eager")
    assert result.exit_code == 0, result.stderr
    assert "decoder_kernel" not in json.loads((out / "cfg.json").read_text())
    resumed = invoke("fit", str(random_cache), str(out), *FIT_TINY, "--decoder-kernel", "auto", "--resume")
    assert resumed.exit_code == 0 and "already trained" in resumed.output, resumed.stderr


# On CUDA: the compiled kernels at Pythia-70m's SAE shape (B 4096, d 512, n 32768 = 64 x 512), k 32 or AuxK's 256.
GPU_SHAPE = (4096, 32768, 512)


def cuda_inputs(dtype: torch.dtype, k: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of random scores, with 8 latents favoured so that nearly every row picks them (long CSC loops)."""
    b, n, d = GPU_SHAPE
    gen = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(b, n, generator=gen, device="cuda")
    scores[:, :8] += 0.99
    indices = scores.topk(k, dim=1).indices
    values = (torch.rand(b, k, generator=gen, device="cuda") + 0.1).to(dtype)
    weight = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, device="cuda"), dim=1).to(dtype)
    return values, indices, weight, torch.randn(b, d, generator=gen, device="cuda").to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [32, 256], ids=["k32", "k256"])
def test_triton_matches_eager_on_cuda(dtype: torch.dtype, k: int) -> None:
    """Forward and backward against the eager decoder on CUDA, run on float64 copies of the same inputs; the
    tolerance is relative to each tensor's largest entry (float32: summation order; bfloat16: one rounding)."""
    pytest.importorskip("triton")
    values, indices, weight, g = cuda_inputs(dtype, k)
    got = forward_backward(TritonSparseDecode, values, indices, weight, g)
    want = forward_backward(_SparseDecode, values.double(), indices, weight.double(), g.double())
    rel = 2**-7 if dtype == torch.bfloat16 else 1e-4  # float32 sums of up to 4,096 pairs (hot latents)
    for name, out, ref in zip(("y", "grad_values", "grad_weight"), got, want, strict=True):
        assert out.dtype == dtype, name
        err = float((out.double() - ref).abs().max())
        assert err <= rel * float(ref.abs().max()), f"{name}: max error {err:.3g}, scale {float(ref.abs().max()):.3g}"


@pytest.mark.gpu
def test_triton_backward_on_cuda_is_deterministic() -> None:
    pytest.importorskip("triton")
    values, indices, weight, g = cuda_inputs(torch.float32)
    first = forward_backward(TritonSparseDecode, values, indices, weight, g)
    second = forward_backward(TritonSparseDecode, values, indices, weight, g)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_auto_picks_triton_for_an_sae_on_cuda() -> None:
    """TopKSAE.decode goes through the Triton kernels on CUDA and agrees with the eager decoder."""
    pytest.importorskip("triton")
    assert resolve_decoder_kernel("auto", "cuda") == "triton"
    x = torch.randn(300, 48, device="cuda")
    grads = {}
    for kernel in ("auto", "eager"):
        model = TopKSAE(SaeConfig(48, 384, 8), torch.Generator().manual_seed(0), decoder_kernel=kernel).cuda()
        out = model(x)
        out.x_hat.pow(2).sum().backward()
        grads[kernel] = (out.x_hat.detach(), model.W_dec.grad, model.encoder.weight.grad)
    for a, b in zip(grads["auto"], grads["eager"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
