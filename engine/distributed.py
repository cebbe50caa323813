"""torchrun support: one process per GPU (or per CPU replica with gloo)."""

import hashlib
import os
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.config import ConfigError
from engine.stopping import say

JOIN_S = 600  # how long the processes of a world wait for each other, and any collective (NCCL's default)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    control: object = None  # a CPU (gloo) process group for host-side agreement (engine/stopping.py)

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
    waiting = threading.Timer(10, say, [f"process {rank} of $WORLD_SIZE={world_size}: waiting for the others at "
                                        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} (at most "
                                        f"{JOIN_S} s); start them together with torchrun, or unset WORLD_SIZE"])
    waiting.daemon = True
    waiting.start()  # said only when the others are late: a torchrun world meets at once
    try:  # a process started by hand with WORLD_SIZE > 1 and no peers: an error after JOIN_S, not a 30-minute hang
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=JOIN_S))
    except (RuntimeError, dist.DistError) as e:
        first = (str(e).strip().splitlines() or ["-"])[0][:160]
        raise ConfigError(f"the {world_size} processes of $WORLD_SIZE did not all meet at $MASTER_ADDR:$MASTER_PORT "
                          f"within {JOIN_S} s ({type(e).__name__}: {first}); start them together, with torchrun") from None
    finally:
        waiting.cancel()
    control = dist.new_group(backend="gloo") if device_type == "cuda" else dist.group.WORLD
    return Dist(rank, local_rank, world_size, control)


def all_reduce_sum(tensor, info):
    if info.enabled:
        dist.all_reduce(tensor)
    return tensor


def average_buffers(module, info):
    """Each replica's BatchNorm statistics come from its own images (the paper's per-accelerator
    BatchNorm); averaging them is what the official eval_step's pmean does. Running statistics
    are linear in their updates, so averaging once an epoch equals averaging every step."""
    if info.enabled:
        all_reduce_mean([b for b in module.buffers() if b.is_floating_point()])


@torch.no_grad()
def all_reduce_mean(tensors):
    """Replace each tensor by its mean over the processes, in one all-reduce."""
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, f in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(f)


def replica_digests(module, info):
    """SHA-256 of every rank's parameter bytes, gathered on all ranks: equal digests mean the
    replicas are bitwise identical (DDP keeps them so; a step taken on one rank only would not)."""
    digest = hashlib.sha256()
    for p in module.parameters():
        digest.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, digest.hexdigest())
    return gathered


def averaged_state(module, info):
    """module.state_dict() with every floating-point buffer (BatchNorm's running statistics) averaged
    over the processes, in copies: the replicas' own statistics stay as they are, so a checkpoint
    taken mid-epoch leaves the run unchanged. Every rank must call it."""
    state = module.state_dict()
    if info.enabled:
        names = [name for name, b in module.named_buffers() if b.is_floating_point() and name in state]
        copies = [state[name].clone() for name in names]
        all_reduce_mean(copies)
        state.update(zip(names, copies))
    return state
