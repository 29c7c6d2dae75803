"""One home for the process group: rank/world discovery, setup, barriers, precision.

Training (`refbench.train`), evaluation (`refbench.eval.evaluate`) and the loaders
(`refbench.data`) all need to know which rank they are, how many ranks there are, which
device to use and which autocast dtype an `--amp` setting means. They ask this module, so
none of them imports another for it.

    setup_distributed()     torchrun env (WORLD_SIZE, LOCAL_RANK) -> process group + Dist
                            (NCCL on CUDA, gloo on CPU); a single process needs no env
    dist_info(rank, world)  the arguments when given, else the process group's, else (0, 1)
    barrier(d)              a no-op in a single process
    autocast_dtype(amp, device)
                            "auto" (bf16 on CUDA, full precision on CPU), "bf16", "fp16", "off"
    exact_float32()         a context where float32 means float32: no TF32 convolutions or
                            matmuls (cuDNN allows TF32 by default); evaluation and predict use it
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

AMP_MODES = ("auto", "bf16", "fp16", "off")  # the values of a recipe's amp (autocast_dtype); refbench.train.recipes re-exports them


@dataclass(frozen=True)
class Dist:
    rank: int  # global rank
    world: int  # number of processes
    local_rank: int  # rank on this node (GPU index)
    device: Any  # torch.device this process computes on

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1 and not torch_dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = torch_dist.get_rank() if world > 1 else 0
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def dist_info(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments when given, else torch.distributed's, else (0, 1)."""
    if rank is None or world is None:
        initialised = torch_dist.is_available() and torch_dist.is_initialized()
        rank = (torch_dist.get_rank() if initialised else 0) if rank is None else rank
        world = (torch_dist.get_world_size() if initialised else 1) if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of size {world}")
    return rank, world


def barrier(d: Dist) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if d.world > 1:
        torch_dist.barrier()


def all_gather_object(d: Dist, obj: Any) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank (`[obj]` in a single process)."""
    if d.world == 1:
        return [obj]
    gathered: list = [None] * d.world
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def autocast_dtype(amp: str, device) -> Any:
    """The autocast dtype for an `amp` setting on a device (None = full precision)."""
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp mode {amp!r}; modes: {', '.join(AMP_MODES)}")
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


@contextlib.contextmanager
def exact_float32():
    """float32 means float32 inside: TF32 convolutions and matmuls off (cuDNN allows TF32 by
    default, which flips pixels near the threshold between a GPU and the CPU); restored after."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
