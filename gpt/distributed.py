"""Data-parallel training under torchrun: DDP (NCCL on GPU, gloo on CPU) or FSDP2."""
from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    patient: object = None  # a group whose barrier waits for rank 0 however long it takes (see init)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device: str) -> tuple[World, str]:
    """Joins the torchrun process group when launched by torchrun; returns (world, device)."""
    if "RANK" not in os.environ:
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)
        device = f"cuda:{world.local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    # The collectives' timeout (NCCL's 10 minutes) catches a hung rank; waiting for rank 0 to
    # tokenize a large corpus may take longer, so that wait is on a group with a long one.
    world.patient = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    return world, device


def has_fsdp2() -> bool:
    """Whether this torch has FSDP2 where wrap() takes it: public from torch 2.6 (earlier,
    under a private module), while the rest of this project runs on torch 2.4."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def wrap(model: nn.Module, world: World, device: str, fsdp: bool) -> nn.Module:
    """DDP or FSDP2 around the model; the plain model when not distributed."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # A block returns its MLP's output, a view (F.linear's (M, C) result as (B, T, C)),
        # which the next block adds out of place: the in-place use FSDP2 warns of never comes.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)  # the root holds the tied embedding/head and the final LayerNorm
        return model
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.local_rank] if device.startswith("cuda") else None)


def any_rank(flag: bool, world: World, device: str) -> bool:
    """True on every rank if any rank's flag is True (keeps stop decisions in lockstep)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: int, world: World, device: str) -> int:
    """The largest of the ranks' values, on every rank."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean(t: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a tensor over the ranks, on every rank."""
    if not world.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t)  # a sum: gloo has no AVG
    return t / world.size


def from_main(value: float, world: World, device: str) -> float:
    """Rank 0's value on every rank (e.g. its clock, so all ranks decide alike)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.item()


def barrier(world: World, patient: bool = False) -> None:
    """Waits for every rank; patient: with no timeout to speak of (rank 0 tokenizing)."""
    if world.distributed:
        dist.barrier(group=world.patient if patient else None)


def shutdown(world: World, clean: bool = True) -> None:
    if world.distributed and dist.is_initialized():
        if clean:
            dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()
    # The groups' C++ objects must be freed while Python still runs: one still referenced at
    # exit (world.patient, or an FSDP model's device mesh inside a reference cycle) is
    # destroyed during the interpreter's finalisation, where gloo's pending work aborts the
    # process ("terminate called without an active exception", SIGABRT; pytorch#179291).
    world.patient = None
    gc.collect()
