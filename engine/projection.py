"""How long a run will take on the CPU, measured before its first step, so that nobody is left with
a year-long run by accident: train.py prints the projection, and refuses a run that would take more
than REFUSE_H hours on a CPU it fell back to (--device auto without a GPU), unless --device cpu says
the CPU is meant. `train.py --check` and a local sweep refuse the same runs, from the same measurement."""

import shlex
import sys
import time
from pathlib import Path

import torch

from data.cifar import resolve_data_dir
from engine.config import ConfigError, num_classes
from engine.step import build_training

REFUSE_H = 12
SMOKE = "python train.py --config configs/resnet18_sam.yaml --subset 512 --batch-size 64 --epochs 2"


_MEASURED = {}  # a sweep checks many runs of few models: each is measured once per process


def pass_seconds(config, runtime):
    """Seconds of one forward-backward pass of a batch of the run's size, measured on a throwaway model
    (the run's random state untouched). A pass costs a fixed part plus a part per image, so it is timed
    on 8 images and on a larger batch (64, or 32 for a model slow on 8; the batch itself when smaller)
    and the line through the two is read at the batch size: 8 images alone spread the fixed part over
    too few (they made ResNet-18's smoke run look 4 times as long). The first pass warms up and is not
    timed; the faster of two timed passes counts where a pass is quick (other work only slows one down).
    -> (seconds, [(images, seconds) measured])"""
    batch_size = config["batch_size"]
    key = (config["model"], config["dropout"], config["norm"], num_classes(config), batch_size, runtime.precision)
    if key in _MEASURED:
        return _MEASURED[key]
    with torch.random.fork_rng(devices=[]):
        step = build_training({**config, "m_sharpness": 0, "compile": "off"}, num_classes(config), runtime,
                              total_steps=2).step

        def timed(images, repeat):
            x, y, times = torch.zeros(images, 3, 32, 32), torch.zeros(images, dtype=torch.long), []
            for _ in range(repeat):
                start = time.perf_counter()
                step(x, y, False)
                times.append(time.perf_counter() - start)
                if times[-1] > 0.5:
                    break
            return min(times)

        small = min(8, batch_size)
        timed(small, 1)  # warm-up
        points = [(small, timed(small, 2))]
        if batch_size > small:
            large = min(batch_size, 64 if points[0][1] < 1 else 32)
            points.append((large, timed(large, 2)))
    _MEASURED[key] = _line_through(points, batch_size), points
    return _MEASURED[key]


def _line_through(points, batch_size):
    if len(points) == 1:
        (n, t), = points
        return t * batch_size / n
    (n0, t0), (n1, t1) = points
    slope = (t1 - t0) / (n1 - n0)
    return t0 + slope * (batch_size - n0) if slope > 0 else t1 * batch_size / n1  # noise: the larger batch's rate


def duration(config, runtime, steps, eval_images, epoch=0, batch=0):
    """-> (seconds, the line that says them) for the epochs of `config` from `epoch`, batch `batch` on:
    forward-backward passes (two per SAM step), and evaluation at about a third of a pass per image."""
    per_pass, points = pass_seconds(config, runtime)
    passes = sum(1 + (config["optimizer"] == "sam" and e >= config["sam_start_epoch"]) * config["sam_prob"]
                 for e in range(epoch, config["epochs"])) * steps - batch
    total = per_pass * (passes + eval_images / 3 / config["batch_size"] * (config["epochs"] - epoch))
    to_go = round(config["epochs"] - epoch - batch / steps, 2)
    measured = " and ".join(f"{n} images {t:.2f} s" for n, t in points)
    return total, (f"on this CPU the {to_go:g} epoch{'s' if to_go != 1 else ''} to go would take about "
                   f"{format_duration(total)} (measured: one pass of {measured})")


def smoke(config):
    """The smoke run's command, on the data this command reads (its --data-dir, unless the default)."""
    folder = Path(config["data_dir"]).expanduser() if config["data_dir"] else None
    given = folder is not None and folder.resolve() != resolve_data_dir().resolve()
    return SMOKE + (f" --data-dir {shlex.quote(str(folder))}" if given else "")


def refuse_if_too_long(config, runtime, steps, eval_images, epoch=0, batch=0):
    """On a CPU that --device auto fell back to: ConfigError when the run would take over REFUSE_H
    hours. -> the projection's (seconds, line) on the CPU, else None."""
    if runtime.device.type != "cpu":
        return None
    total, line = duration(config, runtime, steps, eval_images, epoch, batch)
    if total > 3600 * REFUSE_H and config["device"] == "auto":
        raise ConfigError(f"no GPU here, and {line}; for a smoke test of the whole pipeline: {smoke(config)}, or pass "
                          f"--device cpu to train on the CPU anyway")
    return total, line


def project(run):
    """On the CPU: print how long the epochs to go would take, or refuse (refuse_if_too_long)."""
    projected = refuse_if_too_long(run.config, run.runtime, len(run.train_loader),
                                   sum(len(loader.labels) for loader in run.eval_loaders.values()), run.epoch, run.batch)
    if projected is not None:
        total, line = projected
        print(f"note: {line}" + (f". For a smoke test of the whole pipeline: {smoke(run.config)}" if total > 3600 else ""),
              file=sys.stderr, flush=True)


def format_duration(seconds):
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
