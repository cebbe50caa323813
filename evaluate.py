"""Evaluate a trained run (its folder or a last.pt): loss, accuracy, error, per-class accuracy and
expected calibration error (15 bins, Guo et al. 2017), on the clean test set, the run's validation
split, or a distribution-shift set.

    python evaluate.py runs/NAME                          # the test set (as the run saw it)
    python evaluate.py runs/NAME --split val              # the validation images the run held out
    python evaluate.py runs/NAME --data-dir ~/CIFAR-10.1  # cifar10.1_v6_data.npy + _labels.npy
    python evaluate.py runs/NAME --data-dir ~/CIFAR-10-C  # labels.npy + one .npy per corruption
    python evaluate.py runs/NAME --json out.json          # every figure, per corruption and severity too

The images are normalised with the run's own training statistics and evaluated exactly as train.py
evaluates after each epoch (engine/evaluation.py; the run's precision and batch size), so a finished
run's test accuracy here equals the final_test_acc of its results.json.
"""

import signal

if __name__ == "__main__":  # Ctrl-C while Python imports torch: exit now, no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from analysis.figures import OutputError, check_output_file
from data import DataError
from data.cifar import is_data_folder
from data.loaders import DeviceLoader
from engine import checkpoint
from engine.config import ConfigError, OneLineParser, read, refuse
from engine.evaluation import evaluate_loader
from engine.resume import run_data
from engine.step import resolve_runtime
from train import data_loaders

CLASSES = {"cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")}


def parse(argv):
    p = OneLineParser(prog="python evaluate.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--split", choices=("test", "val"), default="test", help="with the run's own data")
    p.add_argument("--data-dir", help="a CIFAR-10.1 or CIFAR-10-C folder (.npy files); default: the run's own data")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's)")
    p.add_argument("--json", help="also write every figure to this file")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.split == "val" and args.data_dir:
        raise ConfigError("--split val is the run's own held-out images; drop --data-dir (or --split)")
    if args.json is not None:
        try:
            run = Path(os.path.realpath(args.run))  # its folder may hold the figures; no other run's may
            check_output_file(args.json, "--json", example="eval.json", own=[run if run.is_dir() else run.parent],
                              kind=".json")
        except OutputError as e:
            raise ConfigError(str(e)) from None
    return args


def shift_sets(folder):
    """{name: (uint8 N x 3 x 32 x 32, labels)} of a CIFAR-10.1 folder (<name>_data.npy, <name>_labels.npy)
    or a CIFAR-10-C folder (labels.npy, one <corruption>.npy of 10,000 images per severity, 5 severities
    in the official files). Every array is checked before any is used: a bad one is a ConfigError."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--data-dir {folder} is not a folder; give a CIFAR-10.1 or CIFAR-10-C folder, or omit "
                          f"--data-dir to evaluate on the run's own test set")
    arrays = sorted(folder.glob("*.npy"))
    sets = {}
    for data in [path for path in arrays if path.name.endswith("_data.npy")]:  # CIFAR-10.1
        labels = data.with_name(data.name[:-len("_data.npy")] + "_labels.npy")
        if not labels.is_file():
            raise ConfigError(f"{data} has no labels beside it: CIFAR-10.1 keeps them in {labels.name}")
        sets[data.name[:-len("_data.npy")]] = (images(data), labels_of(labels))
    corruptions = [path for path in arrays if not path.name.endswith(("_data.npy", "_labels.npy"))
                   and path.name != "labels.npy"]
    if corruptions and not (folder / "labels.npy").is_file() and not sets:
        raise ConfigError(f"{folder} holds {len(corruptions)} .npy arrays but no labels.npy: CIFAR-10-C keeps its "
                          f"labels there (one per image of a corruption's file)")
    if (folder / "labels.npy").is_file():  # CIFAR-10-C
        labels = labels_of(folder / "labels.npy")
        if len(labels) % 10000:
            raise ConfigError(f"{folder / 'labels.npy'} holds {len(labels)} labels, not 10,000 per severity "
                              f"(CIFAR-10-C: 5 severities x 10,000)")
        for path in corruptions:
            x = images(path)
            if len(x) != len(labels):
                raise ConfigError(f"{path} holds {len(x)} images and labels.npy {len(labels)} labels; a CIFAR-10-C "
                                  f"corruption has one image per label (10,000 per severity)")
            for severity in range(len(x) // 10000):
                part = slice(severity * 10000, (severity + 1) * 10000)
                sets[f"{path.stem}/{severity + 1}"] = (x[part], labels[part])
    if not sets:
        cifar = next((f for f in (folder, *folder.glob("cifar-10*-*")) if f.is_dir() and is_data_folder(f)), None)
        held = f"{cifar} holds CIFAR-10/100 itself, which the run reads from its own config" if cifar else \
            f"no CIFAR-10.1 (*_data.npy) or CIFAR-10-C (labels.npy) files in {folder}"
        raise ConfigError(f"--data-dir: {held}; --data-dir is for a CIFAR-10.1 or CIFAR-10-C folder: omit it to "
                          f"evaluate on the run's own test set")
    for name, (x, y) in sets.items():
        if len(x) != len(y):
            raise ConfigError(f"{folder}: {name} has {len(x)} images and {len(y)} labels")
    return sets


def array(path):
    """A .npy file as numpy reads it without running code (no pickles) -> array; a ConfigError if not."""
    if not Path(path).is_file():  # a named pipe would block the reader forever
        raise ConfigError(f"{path} is not a regular file; CIFAR-10.1 and CIFAR-10-C arrays are .npy files")
    try:  # memory-mapped: a header that claims more than the file holds is an error, not an allocation
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":  # np.load also opens .npz archives (and checkpoints: zip files)
                raise ValueError("no .npy signature")
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f"{path} is not a plain .npy array ({type(e).__name__}: {str(e)[:120]}); CIFAR-10.1 and "
                          f"CIFAR-10-C are distributed as such") from None


def images(path):
    x = array(path)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or not len(x):
        raise ConfigError(f"{path} holds {x.dtype} {x.shape}, not uint8 N x 32 x 32 x 3 images")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def labels_of(path):
    y = array(path)
    if y.ndim != 1 or y.dtype.kind not in "iu" or not len(y) or y.min() < 0 or y.max() > 9:
        raise ConfigError(f"{path} holds {y.dtype} {y.shape}" + (f" from {y.min()} to {y.max()}" if y.size and
                          y.dtype.kind in "iuf" else "") + ", not one CIFAR-10 class (an integer 0-9) per image")
    return y


def main(argv=None):
    try:
        args = parse(argv)
        try:
            model, state, path, config = checkpoint.load_model(args.run, "cpu")
        except ValueError as e:
            raise ConfigError(f"{e}; give a run folder or its last.pt") from None
        runtime = resolve_runtime({**config, "device": args.device})
        model.to(runtime.device).eval()
        if runtime.channels_last:
            model.to(memory_format=torch.channels_last)
        config = {**config, "eval_batch_size": args.batch_size or config["eval_batch_size"]}
        data = run_data(config, state)  # the run's own data: its training statistics come from it
        _, loaders = data_loaders(config, data, runtime)
        if args.split == "val" and "val" not in loaders:
            raise ConfigError(f"{path.parent} held out no validation images (val_split 0); use --split test")
        if args.data_dir:
            norm = loaders["test"].normaliser
            if config["dataset"] != "cifar10":
                raise ConfigError("CIFAR-10.1 and CIFAR-10-C are CIFAR-10 sets; this run trained on " + config["dataset"])
            loaders = {name: DeviceLoader(x, y.astype(np.int64), batch_size=config["eval_batch_size"],
                                          device=runtime.device, normaliser=norm)
                       for name, (x, y) in shift_sets(args.data_dir).items()}
        else:
            loaders = {args.split: loaders[args.split]}
    except (ConfigError, DataError) as e:
        return refuse(e)
    except KeyboardInterrupt:
        return 130
    data.warn()
    results = {name: evaluate_loader(model, loader, runtime.autocast, data.num_classes)
               for name, loader in loaders.items()}
    report(results, config, state, path)
    if args.json:
        document = {"run": str(path.parent), "epoch": state["epoch"], "step": state["step"],
                    "precision": runtime.precision, "sets": results}
        checkpoint.atomic_write(Path(args.json), (json.dumps(document, indent=2) + "\n").encode())
        print(f"written: {args.json}")
    return 0


def report(results, config, state, path):
    print(f"{path.parent}: {config['model']} on {config['dataset']}, epoch {state['epoch']}, step {state['step']}")
    print(f"{'set':<28} {'images':>7} {'loss':>8} {'accuracy':>9} {'error %':>8} {'ECE':>7}")
    for name, r in results.items():
        print(f"{name:<28} {r['images']:>7} {r['loss']:>8.4f} {r['acc']:>9.4f} {100 * r['error']:>8.2f} {r['ece']:>7.4f}")
    if len(results) == 1:
        (name, r), = results.items()
        names = CLASSES.get(config["dataset"], [str(i) for i in range(len(r["per_class_acc"]))])
        if len(names) <= 10:
            print("per class: " + ", ".join(f"{c} {a:.3f}" for c, a in zip(names, r["per_class_acc"])))
        else:
            worst = sorted(range(len(names)), key=lambda i: r["per_class_acc"][i])[:5]
            print("worst classes: " + ", ".join(f"{i} {r['per_class_acc'][i]:.3f}" for i in worst))
    try:
        recorded = json.loads(read(path.parent / "results.json"))
    except (OSError, ValueError, RecursionError):
        return
    if "test" in results and isinstance(recorded, dict) and recorded.get("epochs") == state["epoch"] and \
            isinstance(recorded.get("final_test_acc"), float):
        same = "the same" if recorded["final_test_acc"] == results["test"]["acc"] else "DIFFERENT"
        print(f"results.json final_test_acc {recorded['final_test_acc']:.4f}: {same}")


if __name__ == "__main__":
    from engine.stopping import entry
    sys.exit(entry(main))
