"""Images per second of each training-loader path on the real data (one pass, no model).

    python -m benchmarks.loader_throughput --data-dir DIR [--device cuda] [--batches 100]
"""

import argparse
import sys
import time

import torch

from benchmarks.record import RESULTS, save
from engine.config import OneLineParser
from data import build_loaders, load_cifar

CASES = [("basic", "device"), ("cutout", "device"), ("basic", "workers"), ("autoaugment", "workers")]


def main():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON figures")
    args = p.parse_args()
    device = torch.device(args.device)
    data = load_cifar("cifar10", args.data_dir)
    data.warn()
    print(f"device {device}, batch {args.batch_size}, {args.batches} batches, {args.workers} workers, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    rows = []
    for augment, loader in CASES:
        train, _ = build_loaders(data, augment=augment, batch_size=args.batch_size, device=device, loader=loader,
                                 workers=args.workers)
        train.set_epoch(0)
        batches = iter(train)
        next(batches)  # start-up (workers, first transfer) is not throughput
        start = time.perf_counter()
        seen = 0
        for _, (images, labels) in zip(range(args.batches), batches):
            seen += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = seen / (time.perf_counter() - start)
        print(f"{augment:12s} {loader:8s} loader  {rate:10,.0f} images/s")
        rows.append({"augment": augment, "loader": loader, "images_per_s": rate})
    save("loader_throughput", device, {"batch_size": args.batch_size, "batches": args.batches,
                                       "workers": args.workers, "rows": rows}, args.out)


if __name__ == "__main__":
    from engine.stopping import entry
    sys.exit(entry(main))
