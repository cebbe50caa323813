"""Training-step throughput of train.py's own step (engine.step.TrainStep, built by the same
builders from the same settings), on synthetic batches already on the device.

    python -m benchmarks.throughput --model wrn28_10 --batch-size 256 --compile reduce-overhead
    python -m benchmarks.throughput --model resnet18 --compare --vs-sgd

Prints ms/step, images/s, projected epoch and 200-epoch times (50,000 images, no evaluation),
peak memory, achieved TFLOP/s and the share of the device's dense bf16 peak. --compare also
times a plain fp32, per-parameter-loop SAM step (the common implementation) in this process;
--vs-sgd times the SGD step with the same settings (the ideal SAM/SGD ratio is 2).
Any train.py flag not listed here may follow and is applied to the config (e.g. --rho 0.1).
"""

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.reference_sam import LoopSAM
from engine import builders
from engine.config import parse_config
from engine.distributed import Dist
from engine.step import TrainStep
from models import build_model
from sam import frozen_bn_stats

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets).
BF16_PEAK = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}
TRAIN_IMAGES = 50_000


def device_peak(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def synthetic_batch(batch_size, device, channels_last, classes=10):
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32, generator=g).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, classes, (batch_size,), generator=g).to(device)


def time_steps(step, steps, warmup, device):
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def train_step(config, device, precision, channels_last):
    """train.py's step, from train.py's builders."""
    model, net, forward = builders.build_network(config, 10, device, channels_last, Dist())
    optimizer = builders.build_optimizer(config, model, device)
    step = TrainStep(forward, net, optimizer, torch.nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"]),
                     sam=config["optimizer"] == "sam", autocast=builders.autocast_factory(precision, device),
                     scaler=builders.grad_scaler(precision, device),
                     cudagraphs=config["compile"] == "reduce-overhead" and device.type == "cuda")
    images, labels = synthetic_batch(config["batch_size"], device, channels_last)
    return lambda: step(images, labels)


def loop_sam_step(config, device):
    """The common baseline: fp32, contiguous, eager, per-parameter-loop SAM."""
    model = build_model(config["model"]).to(device)
    optimizer = LoopSAM(model.parameters(), torch.optim.SGD, rho=config["rho"], lr=config["lr"],
                        momentum=config["momentum"], weight_decay=config["weight_decay"])
    criterion = torch.nn.CrossEntropyLoss()
    images, labels = synthetic_batch(config["batch_size"], device, False)

    def step():
        criterion(model(images), labels).backward()
        optimizer.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            criterion(model(images), labels).backward()
        optimizer.second_step(zero_grad=True)
    return step


def step_flops(config, device, passes):
    model = build_model(config["model"]).to(device)
    images, labels = synthetic_batch(config["batch_size"], device, False)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() * passes


def report(name, ms, batch_size, flops, peak, device):
    images_s = batch_size * 1e3 / ms
    epoch_s = TRAIN_IMAGES // batch_size * ms / 1e3
    tflops = flops / ms / 1e9
    line = (f"{name:34s} {ms:9.2f} ms/step {images_s:10,.0f} images/s  epoch {epoch_s:8.1f} s  "
            f"200 epochs {200 * epoch_s / 60:7.1f} min  {tflops:7.2f} TFLOP/s")
    if peak:
        line += f" ({100 * tflops / peak:.0f}% of bf16 peak)"
    if device.type == "cuda":
        line += f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    print(line, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, cudnn autotune)")
    p.add_argument("--compare", action="store_true", help="also time the fp32 per-parameter-loop SAM step")
    p.add_argument("--vs-sgd", action="store_true", help="also time the SGD step with the same settings")
    args, train_flags = p.parse_known_args(argv)
    config, _ = parse_config(train_flags)
    dist_info = Dist()
    device = builders.resolve_device(config["device"], dist_info.local_rank)
    precision = builders.resolve_precision(config["precision"], device)
    channels_last = device.type == "cuda" if config["channels_last"] is None else config["channels_last"]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    peak = device_peak(device)
    print(f"{config['model']} batch {config['batch_size']} {config['optimizer']} precision {precision} "
          f"channels_last {channels_last} compile {config['compile']} on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    passes = 2 if config["optimizer"] == "sam" else 1
    flops = step_flops(config, device, passes)
    ms = time_steps(train_step(config, device, precision, channels_last), args.steps, args.warmup, device)
    report(f"train.py step ({config['optimizer']})", ms, config["batch_size"], flops, peak, device)
    if args.vs_sgd and config["optimizer"] == "sam":
        sgd_ms = time_steps(train_step({**config, "optimizer": "sgd"}, device, precision, channels_last),
                            args.steps, args.warmup, device)
        report("train.py step (sgd)", sgd_ms, config["batch_size"], flops / 2, peak, device)
        print(f"SAM / SGD step time: {ms / sgd_ms:.2f}x (ideal 2.00x)")
    if args.compare:
        ref_ms = time_steps(loop_sam_step(config, device), args.steps, args.warmup, device)
        report("fp32 per-parameter-loop SAM", ref_ms, config["batch_size"], step_flops(config, device, 2), peak,
               device)
        print(f"speed-up over the fp32 loop SAM step: {ref_ms / ms:.2f}x")


if __name__ == "__main__":
    main()
