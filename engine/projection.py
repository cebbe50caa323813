"""How long a run will take on the CPU, measured before its first step, so that nobody is left with
a year-long run by accident: train.py prints the projection, and refuses a run that would take more
than REFUSE_H hours on a CPU it fell back to (--device auto without a GPU), unless --device cpu says
the CPU is meant."""

import sys
import time

import torch

from engine.config import ConfigError, num_classes
from engine.step import build_training

REFUSE_H = 12
SMOKE = "python train.py --config configs/resnet18_sam.yaml --subset 512 --batch-size 64 --epochs 2"


def pass_seconds(config, num_classes, runtime, budget_s=3.0):
    """Seconds per image of one forward-backward pass of this model, on a throwaway copy (the run's
    random state untouched): steps on 8 images, and on 64 when 8 are quick (a small batch overstates
    the cost per image of a small model), the fastest warm one kept (other work only slows a step down;
    the first step, which also warms up, can take several times as long). At least two steps, and
    no more once a step takes over a second. -> (s, images)"""
    with torch.random.fork_rng(devices=[]):
        step = build_training({**config, "m_sharpness": 0, "compile": "off"}, num_classes, runtime,
                              total_steps=2).step
        deadline = time.perf_counter() + budget_s
        for probe in (8, 64):
            images, labels = torch.zeros(probe, 3, 32, 32), torch.zeros(probe, dtype=torch.long)
            times = []
            while len(times) < 2 or (len(times) < 4 and time.perf_counter() < deadline and max(times) < 1):
                start = time.perf_counter()
                step(images, labels, False)
                times.append(time.perf_counter() - start)
            times = times[1:]  # the first step warms up
            if min(times) > 0.5 or probe >= config["batch_size"] or time.perf_counter() > deadline:
                break
    return min(times) / probe, probe


def project(run):
    """On the CPU: print how long the epochs to go would take; ConfigError when that is more than
    REFUSE_H hours and the CPU was not asked for."""
    config = run.config
    if run.runtime.device.type != "cpu":
        return
    per_image, probe = pass_seconds(config, num_classes(config), run.runtime)
    steps = len(run.train_loader)
    passes = sum(1 + (config["optimizer"] == "sam" and e >= config["sam_start_epoch"]) * config["sam_prob"]
                 for e in range(run.epoch, config["epochs"])) * steps - run.batch
    evaluation = sum(len(loader.labels) for loader in run.eval_loaders.values()) / 3 * (config["epochs"] - run.epoch)
    total = per_image * (passes * config["batch_size"] + evaluation)
    to_go = round(config["epochs"] - run.epoch - run.batch / steps, 2)
    line = (f"on this CPU the {to_go:g} epoch{'s' if to_go != 1 else ''} to go would take about {format_duration(total)} "
            f"(measured: one pass of {probe} images took {per_image * probe:.2f} s)")
    if total > 3600 * REFUSE_H and config["device"] == "auto":
        raise ConfigError(f"no GPU here, and {line}; for a smoke test of the whole pipeline: {SMOKE}, or pass "
                          f"--device cpu to train on the CPU anyway")
    print(f"note: {line}" + (f". For a smoke test of the whole pipeline: {SMOKE}" if total > 3600 else ""),
          file=sys.stderr, flush=True)


def format_duration(seconds):
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
