"""torchrun support: one process per GPU (or per CPU replica with gloo)."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def init_distributed(device_type):
    """Reads torchrun's environment; a plain `python train.py` is a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size)


def all_reduce_sum(tensor, info):
    if info.enabled:
        dist.all_reduce(tensor)
    return tensor


def replica_checksums(module, info):
    """A bitwise checksum of the parameters from every rank. DDP keeps replicas identical;
    comparing once at the end of a run catches any drift (e.g. a step taken on one rank only)."""
    bits = [p.detach().flatten().view(torch.int32 if p.element_size() == 4 else torch.int16).to(torch.int64)
            for p in module.parameters()]
    local = torch.stack([(b * torch.arange(1, len(b) + 1, device=b.device) % 1_000_003).sum() for b in bits]).sum()
    gathered = [torch.zeros_like(local) for _ in range(info.world_size)]
    dist.all_gather(gathered, local)
    return [int(g) for g in gathered]
