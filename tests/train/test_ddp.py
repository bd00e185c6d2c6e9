"""Data-parallel training: loss shares and gradients equal the global batch's, `torchrun --nproc_per_node 2` fits
the same SAE as one process, a killed run resumes, and a batch that cannot be split is refused before any work.

Two ranks equal one process "within float tolerance", not bit for bit: each rank sums its own rows, then the ranks'
partial sums are added (per-layer FVU statistics, AuxK, every gradient, by the all-reduce), where one process sums all
rows in one pass. The last bits of the sums differ; after 235 Adam steps on this small problem the weights differ by
at most 4e-7 (ATOL allows 25x that). A resumed 2-rank run repeats the same sums in the same order as an uninterrupted
one, and has come out bit for bit equal to it; it is held to the same tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mlsae_cache.core.errors import InputError
from mlsae_train.cli import main
from mlsae_train.config import TrainConfig
from mlsae_train.distributed import World, process_group
from mlsae_train.loss import auxk_loss, fvu_per_layer, total_loss
from mlsae_train.sae import SaeConfig, TopKSAE
from mlsae_train.state import METRICS_NAME, STATE_NAME
from mlsae_train.trainer import fit, step_loss

ATOL = 1e-5
"""Largest weight difference allowed between a 2-rank and a 1-process run (weights are O(0.1-1))."""

OPTIONS = {
    "expansion_factor": 16,
    "k": 1,
    "batch_rows": 128,
    "max_rows": 30000,
    "checkpoint_every_rows": 3000,
    "block_units": 4,
    "device": "cpu",
    # 256 latents, one per row, 128 rows per step: latents die within the run, so AuxK and its all-reduced
    # statistics (and the all-reduced dead-latent counters) take part
    "dead_after_rows": 256,
}


def cli_args(options: dict) -> list[str]:
    return [arg for name, value in options.items() for arg in ("--" + name.replace("_", "-"), str(value))]


def torchrun(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("mlsae-train")
    entry = [str(script)] if script.is_file() else ["--module", "mlsae_train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry, *args]


def assert_close_weights(a: Path, b: Path, atol: float = ATOL) -> None:
    wa, wb = load_file(a / "sae.safetensors"), load_file(b / "sae.safetensors")
    assert sorted(wa) == sorted(wb) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, random_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("one") / "sae"
    fit(TrainConfig(cache=random_cache, out=out, **OPTIONS))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, random_cache: Path) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("two") / "sae"
    done = subprocess.run(
        torchrun("--quiet", "fit", str(random_cache), str(out), *cli_args(OPTIONS)), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return out, done


# --- the loss: shares of the global batch --------------------------------------------------------------------------


def thread_all_reduces(n: int) -> list:
    """n in-place sums over n threads (one per simulated rank), in the same order on each."""
    barrier, slots = threading.Barrier(n), [None] * n

    def for_rank(i: int):  # noqa: ANN202
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            slots[i] = t.detach().clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()  # every rank has read the slots before any overwrites them
            return t.copy_(total)

        return all_reduce

    return [for_rank(i) for i in range(n)]


def test_loss_shares_sum_to_the_global_loss_and_gradient() -> None:
    """Three simulated ranks with unequal slices, one of them without rows of layer 2: the FVU and AuxK shares, and
    their gradients, add up to those of the whole batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 5.0, 20.0]).repeat(10)[:, None]
    layer = torch.tensor([0, 1, 2] * 10)
    layer[:8] = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])  # rank 0's rows: no layer 2
    w_dec = torch.randn(16, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    pre_acts = torch.randn(30, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    dead = torch.arange(16) % 3 == 0
    slices = [slice(0, 8), slice(8, 19), slice(19, 30)]

    def loss(rows: slice, all_reduce=None) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        x_hat = x[rows] @ w_dec.T @ w_dec * 0.1
        per_layer = fvu_per_layer(x[rows], x_hat, layer[rows], 3, all_reduce=all_reduce)
        aux = auxk_loss(x[rows] - x_hat, pre_acts[rows], dead, w_dec, 4, all_reduce=all_reduce)
        return per_layer, aux

    whole, whole_aux = loss(slice(None))
    whole_grads = torch.autograd.grad(total_loss(whole.mean(), whole_aux), (w_dec, pre_acts))
    with ThreadPoolExecutor(3) as pool:
        shares = list(pool.map(loss, slices, thread_all_reduces(3)))
    torch.testing.assert_close(sum(s for s, _ in shares), whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(sum(a for _, a in shares), whole_aux, rtol=1e-12, atol=0)
    assert shares[0][0][2] == 0  # a layer without rows here contributes nothing, and is not NaN
    share_grads = [torch.autograd.grad(total_loss(s.mean(), a), (w_dec, pre_acts)) for s, a in shares]
    for i, want in enumerate(whole_grads):
        torch.testing.assert_close(sum(g[i] for g in share_grads), want, rtol=1e-10, atol=1e-14)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grad_problem() -> tuple[TopKSAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small SAE, a batch of 64 rows of 3 layers, a third of the latents dead (AuxK on)."""
    gen = torch.Generator().manual_seed(0)
    sae = TopKSAE(SaeConfig(16, 48, 4), torch.Generator().manual_seed(1))
    x = torch.randn(64, 16, generator=gen) * (1 + 10 * torch.rand(64, 1, generator=gen))
    layer = torch.randint(0, 3, (64,), generator=gen)
    return sae, x, layer, torch.arange(48) % 3 == 0


def grad_worker(rank: int, port: int, out: str) -> None:
    """One of two ranks: the trainer's step loss on its half of the batch through the DDP wrapper, backward."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    world = World.from_env()
    sae, x, layer, dead = grad_problem()
    half = slice(32 * rank, 32 * rank + 32)
    with process_group(world, torch.device("cpu")):
        model = world.data_parallel(sae)
        loss = step_loss(sae, x[half], layer[half], 3, dead, 8, world, model)
        l_fvu, l_aux = loss.l_fvu, loss.l_aux
        total_loss(l_fvu, l_aux).backward()
        losses = world.sum_(torch.stack([l_fvu, l_aux]).detach())
        if rank == 0:
            torch.save({"losses": losses, **{name: p.grad for name, p in sae.named_parameters()}}, out)


def test_two_ranks_get_the_gradient_of_the_global_batch(tmp_path: Path) -> None:
    """Summed, not averaged: Adam would hide a factor of world_size in the end-to-end tests."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.start_processes(grad_worker, args=(free_port(), str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out)
    sae, x, layer, dead = grad_problem()
    loss = step_loss(sae, x, layer, 3, dead, 8)
    l_fvu, l_aux = loss.l_fvu, loss.l_aux
    total_loss(l_fvu, l_aux).backward()
    torch.testing.assert_close(got["losses"], torch.stack([l_fvu, l_aux]).detach(), rtol=1e-6, atol=0)
    assert float(l_aux.detach()) > 0
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


# --- torchrun end to end -------------------------------------------------------------------------------------------


def test_two_ranks_fit_the_same_sae_as_one_process(one_process: Path, two_ranks: tuple) -> None:
    out, done = two_ranks
    assert_close_weights(out, one_process)
    cfg_one, cfg_two = (json.loads((p / "cfg.json").read_text()) for p in (one_process, out))
    per_run = ("save_id", "cache_path", "weights_crc32c", "crc32c")  # and the checksums of what records them
    assert {k: v for k, v in cfg_two.items() if k not in per_run} == {
        k: v for k, v in cfg_one.items() if k not in per_run
    }
    # metrics.jsonl written once, by rank 0, with global values
    one, two = metrics(one_process), metrics(out)
    assert [line["step"] for line in two] == [line["step"] for line in one]
    for a, b in zip(one, two, strict=True):
        assert b["rows"] == a["rows"] and b["dead_fraction"] == a["dead_fraction"]
        for key in ("fvu", "l0", "auxk"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert any(line["auxk"] > 0 for line in two)
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports


def rank_pids(launcher: int) -> list[int]:
    """The ranks of a torchrun: its child processes (each in a session of its own)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher:
            pids.append(int(stat.parent.name))
    return pids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_a_killed_two_rank_run_resumes_to_the_same_sae(tmp_path: Path, random_cache: Path, two_ranks: tuple) -> None:
    run = tmp_path / "run"
    cmd = torchrun("--quiet", "fit", str(random_cache), str(run), *cli_args(OPTIONS))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run / STATE_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    ranks = rank_pids(proc.pid)
    killed = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group: the ranks die with it (PR_SET_PDEATHSIG)
    proc.wait()
    proc.stderr.close()
    deadline = time.monotonic() + 10
    while any(map(alive, ranks)) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphans = [pid for pid in ranks if alive(pid)]
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    assert killed, "training finished before it could be killed"
    assert len(ranks) == 2 and not orphans, f"ranks {ranks} outlived their launcher: {orphans}"
    assert metrics(run)[-1]["rows"] < OPTIONS["max_rows"]
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_close_weights(run, two_ranks[0])
    resumed, uninterrupted = metrics(run), metrics(two_ranks[0])
    assert [line["step"] for line in resumed] == [line["step"] for line in uninterrupted]


def test_a_batch_the_ranks_cannot_share_is_refused_before_any_work(
    tmp_path: Path, random_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sae"
    args = ["fit", str(random_cache), str(out), *cli_args({**OPTIONS, "batch_rows": 129})]
    for rank in ("0", "1"):  # what each rank of a torchrun sees: it fails before joining the process group
        env = {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank}
        result = CliRunner().invoke(main, ["--quiet", *args], env=env, catch_exceptions=False)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: --batch-rows 129 is not divisible")
        assert "--batch-rows 128 or 130" in result.stderr
    assert not out.exists()
    # and under torchrun itself, the run ends (no rank waits for another) with nothing written
    done = subprocess.run(torchrun("--quiet", *args), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Error: --batch-rows 129 is not divisible" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, World()),
        ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, World()),
        ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, World(3, 4, 1)),
        ({"WORLD_SIZE": "2"}, "RANK or LOCAL_RANK is missing"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "inconsistent"),
        ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "not an integer"),
    ],
    ids=["unset", "one", "four", "no-rank", "rank-too-large", "not-a-number"],
)
def test_the_world_comes_from_torchrun_variables(env: dict, want: World | str) -> None:
    if isinstance(want, World):
        world = World.from_env(env)
        assert world == want and world.distributed == (want.world_size > 1)
        assert world.all_reduce is None or world.distributed
    else:
        with pytest.raises(InputError, match=want):
            World.from_env(env)
