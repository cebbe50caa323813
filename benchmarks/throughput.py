"""Training-step throughput of train.py's own step (engine.step.build_training, the function
train.py builds it with, from the same settings), on synthetic batches already on the device.

    python -m benchmarks.throughput --model wrn28_10 --batch-size 256 --compile reduce-overhead
    python -m benchmarks.throughput --model resnet18 --compare --vs-sgd

Prints ms/step, images/s, projected epoch and 200-epoch times (50,000 images, no evaluation),
peak memory, achieved TFLOP/s and the share of the device's dense bf16 peak, and writes them to
benchmarks/results/ as JSON. --compare also times a plain fp32, per-parameter-loop SAM step (the
common implementation) in this process; --vs-sgd times the SGD step with the same settings (the
ideal SAM/SGD ratio is 2); --vs-m, with --m-sharpness M, times M = 0 and both m-sharpness
implementations (vmap, loop). Any train.py flag not listed here may follow and is applied to the
config (e.g. --rho 0.1).
"""

import argparse
import sys
import itertools
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from analysis.hessian import HessianOperator, power_iteration
from benchmarks.record import RESULTS, save
from benchmarks.reference_sam import LoopSAM
from engine.config import ConfigError, OneLineParser, parse_config
from engine.step import build_training, resolve_runtime, takes_sam_step
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


def train_step(config, runtime):
    """train.py's step, built by train.py's own function; a SAM or an SGD step as train.py's loop takes
    them (--sam-prob: drawn per step)."""
    step = build_training(config, 10, runtime, total_steps=10**6).step
    images, labels = synthetic_batch(config["batch_size"], runtime.device, runtime.channels_last)
    counter = itertools.count()
    return lambda: step(images, labels, takes_sam_step(config, config["sam_start_epoch"], next(counter)))


def lambda_max_seconds(config, runtime):
    """What one --sharpness-every measurement costs: 20 power iterations of Hessian-vector products on
    one batch, BatchNorm in eval mode, as train.py's sharpness()."""
    model = build_training(config, 10, runtime, total_steps=1).model.eval()
    images, labels = synthetic_batch(config["batch_size"], runtime.device, runtime.channels_last)
    operator = HessianOperator(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]),
                               [p for p in model.parameters() if p.requires_grad], [(images, labels)])
    power_iteration(operator, iters=2)  # warm-up
    sync(runtime.device)
    start = time.perf_counter()
    power_iteration(operator, iters=20)
    sync(runtime.device)
    return time.perf_counter() - start


def checkpoint_seconds(config, runtime, folder):
    """What one mid-epoch checkpoint costs the loop (--checkpoint-every-min, a stop signal): the model's
    and optimizer's state copied to the host, serialised and written atomically, as train.py does."""
    from engine import checkpoint
    t = build_training(config, 10, runtime, total_steps=10)
    images, labels = synthetic_batch(config["batch_size"], runtime.device, runtime.channels_last)
    t.step(images, labels)  # momentum exists
    sync(runtime.device)
    start = time.perf_counter()
    checkpoint.save_atomic({"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
                            "schedule": t.schedule.state_dict(), "rng": checkpoint.rng_state()}, folder / "probe.pt")
    seconds = time.perf_counter() - start
    size = (folder / "probe.pt").stat().st_size
    (folder / "probe.pt").unlink()
    return seconds, size


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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
    """Print one row and return its figures."""
    images_s = batch_size * 1e3 / ms
    epoch_s = TRAIN_IMAGES // batch_size * ms / 1e3
    tflops = flops / ms / 1e9
    row = {"step": name, "ms_per_step": ms, "images_per_s": images_s, "epoch_s": epoch_s,
           "run_200_epochs_min": 200 * epoch_s / 60, "tflops": tflops,
           "percent_of_bf16_peak": 100 * tflops / peak if peak else None,
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    line = (f"{name:34s} {ms:9.2f} ms/step {images_s:10,.0f} images/s  epoch {epoch_s:8.1f} s  "
            f"200 epochs {200 * epoch_s / 60:7.1f} min  {tflops:7.2f} TFLOP/s")
    if peak:
        line += f" ({row['percent_of_bf16_peak']:.0f}% of bf16 peak)"
    if device.type == "cuda":
        line += f"  peak memory {row['peak_memory_gib']:.1f} GiB"
    print(line, flush=True)
    return row


def main(argv=None):
    p = OneLineParser(prog="python -m benchmarks.throughput", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON figures")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, cudnn autotune)")
    p.add_argument("--compare", action="store_true", help="also time the fp32 per-parameter-loop SAM step")
    p.add_argument("--vs-sgd", action="store_true", help="also time the SGD step with the same settings")
    p.add_argument("--vs-m", action="store_true", help="with --m-sharpness M: also time M = 0 and the loop "
                                                       "implementation")
    p.add_argument("--lambda-max", action="store_true", help="also time one --sharpness-every measurement")
    p.add_argument("--checkpoint", action="store_true", help="also time one mid-epoch checkpoint (written to --out)")
    args, train_flags = p.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps takes a whole number >= 1 and --warmup one >= 0")
    try:
        config = parse_config(train_flags).config
        runtime = resolve_runtime(config)
    except ConfigError as e:
        p.error(str(e))
    if args.vs_m and not config["m_sharpness"]:
        p.error("--vs-m compares against --m-sharpness M: give an M")
    device, precision, channels_last = runtime.device, runtime.precision, runtime.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    peak = device_peak(device)
    print(f"{config['model']} batch {config['batch_size']} {config['optimizer']} precision {precision} "
          f"channels_last {channels_last} compile {config['compile']} m_sharpness {config['m_sharpness']} on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    passes = 1 + (config["sam_prob"] if config["optimizer"] == "sam" else 0)  # forward-backward passes a step
    flops = step_flops(config, device, passes)
    rows, ratios = [], {}

    def timed(name, step_config, step_flops_=flops):
        ms = time_steps(train_step(step_config, runtime), args.steps, args.warmup, device)
        rows.append(report(name, ms, config["batch_size"], step_flops_, peak, device))
        return ms

    m = config["m_sharpness"]
    ms = timed(f"train.py step ({config['optimizer']}" + (f", m {m}, {config['m_sharpness_impl']})" if m else ")"),
               config)
    if args.vs_sgd and config["optimizer"] == "sam":
        sgd_ms = timed("train.py step (sgd" + (f", m {m})" if m else ")"), {**config, "optimizer": "sgd", "rho": 0.0},
                       flops / 2)
        ratios["sam_over_sgd"] = ms / sgd_ms
        print(f"SAM / SGD step time: {ms / sgd_ms:.2f}x (ideal {passes:.2f}x: forward-backward passes a step)")
    if args.vs_m:
        other = "loop" if config["m_sharpness_impl"] == "vmap" else "vmap"
        other_ms = timed(f"train.py step (m {m}, {other})", {**config, "m_sharpness_impl": other})
        plain_ms = timed("train.py step (m 0)", {**config, "m_sharpness": 0})
        ratios[f"m{m}_{config['m_sharpness_impl']}_over_m0"] = ms / plain_ms
        ratios[f"m{m}_{other}_over_m0"] = other_ms / plain_ms
        print(f"--m-sharpness {m} / M = 0 step time: {config['m_sharpness_impl']} {ms / plain_ms:.2f}x, "
              f"{other} {other_ms / plain_ms:.2f}x")
    if args.compare:
        ref_ms = time_steps(loop_sam_step(config, device), args.steps, args.warmup, device)
        rows.append(report("fp32 per-parameter-loop SAM", ref_ms, config["batch_size"], step_flops(config, device, 2),
                           peak, device))
        ratios["speedup_over_fp32_loop_sam"] = ref_ms / ms
        print(f"speed-up over the fp32 loop SAM step: {ref_ms / ms:.2f}x")
    if args.lambda_max:
        seconds = lambda_max_seconds(config, runtime)
        ratios["lambda_max_s"], ratios["lambda_max_in_steps"] = seconds, seconds * 1e3 / ms
        print(f"one lambda_max measurement (20 power iterations): {seconds:.2f} s = {seconds * 1e3 / ms:.1f} steps")
    if args.checkpoint:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        seconds, size = checkpoint_seconds(config, runtime, Path(args.out))
        ratios.update(checkpoint_s=seconds, checkpoint_mib=size / 2**20, checkpoint_in_steps=seconds * 1e3 / ms)
        print(f"one checkpoint ({size / 2**20:.0f} MiB): {seconds:.2f} s = {seconds * 1e3 / ms:.2f} steps; "
              f"hourly, {seconds / 36:.3f}% of the time")
    save("throughput", device, {"config": {k: config[k] for k in ("model", "batch_size", "optimizer", "m_sharpness",
                                                                  "m_sharpness_impl", "sam_second_order", "compile",
                                                                  "sam_prob")},
                                "precision": precision, "channels_last": channels_last, "steps": args.steps,
                                "warmup": args.warmup, "rows": rows, "ratios": ratios}, args.out, tag=setup_tag(config))


def setup_tag(config):
    """What tells one throughput setup from another, for the file name."""
    tag = f"{config['model']}_b{config['batch_size']}_{config['optimizer']}"
    tag += f"_m{config['m_sharpness']}" if config["m_sharpness"] else ""
    tag += "_second-order" if config["sam_second_order"] else ""
    tag += f"_p{config['sam_prob']:g}" if config["sam_prob"] < 1 else ""
    return tag + (f"_{config['compile']}" if config["compile"] != "off" else "")


if __name__ == "__main__":
    from engine.stopping import entry
    sys.exit(entry(main))
