"""Data-parallel training under torchrun: which rank this process is, its process group, and the few collectives
that training needs.

`torchrun --nproc_per_node N mlsae-train fit ...` starts N copies of the command with WORLD_SIZE, RANK and
LOCAL_RANK set. Each rank trains on its own slice of every global batch (loader.rank_rows); the loss sums its batch
statistics over ranks (loss.py), so that the loss, and the gradients summed over ranks, are those of one process on
the whole batch. Without these variables (or with WORLD_SIZE=1) nothing here touches torch.distributed, and
training takes the single-process path unchanged.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import InputError

log = logging.getLogger(__name__)

TIMEOUT = timedelta(minutes=10)
"""How long a collective waits for the other ranks before failing: a rank that died without torchrun noticing
(another launcher) ends the run after this instead of hanging. Far above the longest wait of a healthy run (rank 0
writing a checkpoint while the others wait at a barrier)."""

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class World:
    """This process's place in a run: rank `rank` of `world_size` processes, `local_rank` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise InputError(
                f"RANK {self.rank}, LOCAL_RANK {self.local_rank}, WORLD_SIZE {self.world_size} are inconsistent "
                "(launch with torchrun, which sets them, or unset them for one process)"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """The world torchrun describes in WORLD_SIZE, RANK and LOCAL_RANK; one process when they are unset."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            values = {name: int(env[name]) for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        except (KeyError, ValueError) as e:
            raise InputError(
                f"WORLD_SIZE={env['WORLD_SIZE']} is set but RANK or LOCAL_RANK is missing or not an integer ({e}); "
                "launch with torchrun, which sets all three, or unset WORLD_SIZE for one process"
            ) from e
        return cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, the trainer state and metrics, and shows progress and logs."""
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """The device of this rank: `requested` in one process; under torchrun CUDA means cuda:LOCAL_RANK."""
        device = resolve_device(requested)
        if not self.distributed or device.type != "cuda":
            return device
        if device.index is not None:
            raise InputError(
                f"--device {requested} names one GPU, but under torchrun rank {self.rank} uses cuda:LOCAL_RANK "
                "(pass --device cuda or auto)"
            )
        if self.local_rank >= torch.cuda.device_count():
            raise InputError(
                f"rank {self.rank} has LOCAL_RANK {self.local_rank}, but this machine has "
                f"{torch.cuda.device_count()} GPUs (pass torchrun --nproc_per_node {torch.cuda.device_count()})"
            )
        return torch.device("cuda", self.local_rank)

    @property
    def all_reduce(self) -> Callable[[Tensor], Tensor] | None:
        """What the loss functions take: a sum over ranks (in place), or None for local statistics."""
        return _sum_ if self.distributed else None

    def sum_(self, t: Tensor) -> Tensor:
        """t summed over ranks, in place; t itself in one process."""
        return _sum_(t) if self.distributed else t

    def any_(self, mask: Tensor) -> Tensor:
        """[n] bool: True where `mask` is True on any rank."""
        if not self.distributed:
            return mask
        return _sum_(mask.to(torch.int32)) > 0

    def gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's rows x [m, d] (the same m on each) laid end to end in rank order: [world_size * m, d]."""
        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def broadcast_(self, t: Tensor) -> None:
        """Overwrite t with rank 0's values."""
        if self.distributed:
            dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def data_parallel(self, module: nn.Module) -> nn.Module:
        """`module` itself in one process; under torchrun, DistributedDataParallel summing gradients over ranks.

        DistributedDataParallel fits the custom autograd Functions of sae.py: it hooks each parameter's gradient
        accumulation, whatever computed the gradient, and all-reduces buckets of gradients while the backward is
        still running (on GPUs with NCCL the transfer hides behind compute). It also broadcasts rank 0's parameters
        on construction, so every rank starts from the same weights. Its default hook averages over ranks; ours
        sums, because each rank's loss is already its share of the global loss (loss.py): the sum is the gradient
        of the global loss, with no multiply-then-divide by world_size.
        """
        if not self.distributed:
            return module
        ids = [self.local_rank] if next(module.parameters()).device.type == "cuda" else None
        ddp = DistributedDataParallel(module, device_ids=ids)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp


ONE_PROCESS = World()
"""A run of one process: no process group, every collective the identity."""


def _sum_(t: Tensor) -> Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _sum_hook(group, bucket):  # noqa: ANN001, ANN202
    # Unannotated on purpose: DDP compares the annotation of `bucket` with dist.GradBucket itself, and this module's
    # `from __future__ import annotations` would make it a string. bucket: dist.GradBucket -> Future[Tensor].
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def is_main_process() -> bool:
    """Whether this process reports (progress bar, final line): rank 0 of a torchrun job, or a lone process."""
    try:
        return World.from_env().is_main
    except InputError:
        return True  # the error itself is raised, and shown, by the command


def _exit_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a launcher killed with SIGKILL (which it cannot
    forward) would leave its ranks training, and rank 0 writing into OUT, with nobody waiting for them. Ask Linux to
    kill this rank when its parent dies. Only under torchrun's agent (TORCHELASTIC_RUN_ID): a rank started by a
    shell script that exits must keep running."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) is unavailable; a killed torchrun may leave this rank running")


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the run's process group for the duration (nothing in one process): gloo on CPU, NCCL on CUDA.

    Call it after the inputs are validated, so that a bad option fails on every rank alike before any rank waits
    for another. The group is torn down on success only: after an error this process exits, and torchrun stops
    the other ranks (a collective they wait in times out after TIMEOUT otherwise).

    Drop the DistributedDataParallel wrapper before the block ends. Its reducer holds the group from C++; freed
    last, with the GIL held, it runs the gloo group's destructor, which joins worker threads that may need the GIL
    to free a tensor: a deadlock (pytorch#56297), seen here about once in a few runs. Freed while the group is still
    registered, it leaves destroy_process_group to free the group through Python, which releases the GIL.
    """
    if not world.distributed:
        yield
        return
    _exit_with_launcher()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size, timeout=TIMEOUT)
    yield
    gc.collect()  # a dropped wrapper caught in a reference cycle is freed now, not after the group
    dist.destroy_process_group()
