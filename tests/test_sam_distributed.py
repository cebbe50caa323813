"""SAM under DistributedDataParallel (gloo, 2 CPU processes): per-replica ascent, shared step."""

import pytest
import copy
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from sam import SAM, frozen_bn_stats, local_gradients

RHO, LR, WORLD = 0.05, 0.1, 2


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def shard(rank):
    g = torch.Generator().manual_seed(100 + rank)  # each replica sees different data
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


def worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    model = DistributedDataParallel(make_model())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    x, y = shard(rank)
    with local_gradients(model):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    perturbed = [p.detach().clone() for p in model.parameters()]
    with frozen_bn_stats(model):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    out[rank] = {"perturbed": perturbed, "final": [p.detach().clone() for p in model.parameters()]}
    dist.destroy_process_group()


def reference():
    """Single process, float64: each replica's own ascent, then the mean of the second gradients."""
    base = make_model().double()
    w0 = [p.detach().clone() for p in base.parameters()]
    second, perturbed = [], []
    for rank in range(WORLD):
        x, y = shard(rank)
        m = copy.deepcopy(base)
        g = torch.autograd.grad(nn.functional.cross_entropy(m(x.double()), y), list(m.parameters()))
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        with torch.no_grad():
            for p, gi in zip(m.parameters(), g):
                p.add_(RHO * gi / norm)
        perturbed.append([p.detach().clone() for p in m.parameters()])
        second.append(torch.autograd.grad(nn.functional.cross_entropy(m(x.double()), y), list(m.parameters())))
    final = [w - LR * (a + b) / 2 for w, a, b in zip(w0, *second)]
    return perturbed, final


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@pytest.mark.slow

def test_ddp_replicas_ascend_locally_and_step_identically():
    out = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), out), nprocs=WORLD, join=True)
    ref_perturbed, ref_final = reference()
    assert not all(torch.equal(a, b) for a, b in zip(out[0]["perturbed"], out[1]["perturbed"]))
    for rank in range(WORLD):
        for got, want in zip(out[rank]["perturbed"], ref_perturbed[rank]):
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    for a, b, want in zip(out[0]["final"], out[1]["final"], ref_final):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.double(), want, rtol=0, atol=1e-6)
