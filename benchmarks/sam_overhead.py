"""SAM's own work per step: first_step + second_step around a base optimizer that does
nothing, so neither forward/backward nor the SGD update is counted. sam.SAM (foreach ops)
against the common per-parameter loop, on WRN-28-10's parameter list. The SGD update alone
is printed for scale.

    python -m benchmarks.sam_overhead [--device cuda] [--repeats 30]
"""

import argparse
import sys
import time

import torch

from benchmarks.record import RESULTS, save
from engine.config import OneLineParser
from benchmarks.reference_sam import LoopSAM
from models import build_model
from sam import SAM


class NoStep(torch.optim.Optimizer):
    def __init__(self, params, **kwargs):
        super().__init__(params, kwargs)

    def step(self, closure=None):
        return None


def set_grads(params, grads):
    for q, g in zip(params, grads):
        q.grad = g.clone()


def measure(params, grads, parts, device, repeats):
    """Median total milliseconds of the timed parts; gradients are (re)set before each part,
    outside the timer, as the backward passes of a real step would."""
    def clock(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    totals = []
    for i in range(repeats + 3):
        total = 0.0
        for part in parts:
            set_grads(params, grads)
            total += clock(part)
        if i >= 3:  # warm-up: backup buffers and allocator caches
            totals.append(total * 1e3)
    return sorted(totals)[len(totals) // 2]


def main():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="wrn28_10")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON figures")
    args = p.parse_args()
    device = torch.device(args.device)
    params = list(build_model(args.model).to(device).parameters())
    grads = [torch.randn_like(q) * 1e-3 for q in params]

    def sam_parts(cls):  # as in training: the gradients are dropped after each pass
        opt = cls(params, NoStep, rho=0.05)
        return [lambda: opt.first_step(zero_grad=True), lambda: opt.second_step(zero_grad=True)]

    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, {args.model}: {len(params)} tensors, "
          f"{sum(q.numel() for q in params):,} parameters, {torch.get_num_threads()} CPU threads; "
          f"median of {args.repeats}")
    ours = measure(params, grads, sam_parts(SAM), device, args.repeats)
    loop = measure(params, grads, sam_parts(LoopSAM), device, args.repeats)
    sgd = measure(params, grads, [sgd.step], device, args.repeats)
    print(f"sam.SAM (foreach)      first_step + second_step  {ours:8.2f} ms")
    print(f"per-parameter loop     first_step + second_step  {loop:8.2f} ms   (sam.SAM is {loop / ours:.2f}x as fast)")
    print(f"for scale: one SGD (momentum, Nesterov, weight decay) update  {sgd:8.2f} ms")
    save("sam_overhead", device, {"model": args.model, "repeats": args.repeats, "sam_foreach_ms": ours,
                                  "per_parameter_loop_ms": loop, "sgd_update_ms": sgd, "speedup": loop / ours},
         args.out)


if __name__ == "__main__":
    from engine.stopping import entry
    sys.exit(entry(main))
