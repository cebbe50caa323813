"""Training curves of runs, overlaid, from their metrics.jsonl alone (no W&B needed): training loss,
test error and learning rate against epochs. Runs that differ only in their seed (folder names equal
once "-seed<k>" is dropped) are drawn as one curve: the mean over seeds, and a band from the lowest
to the highest seed.

    python scripts/plot.py runs/sgd-seed0 runs/sam-seed0 --out curves.png
    python scripts/plot.py runs/ --out curves.png          # every run folder below runs/
"""

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.config import OneLineParser  # noqa: E402

FORMATS = (".png", ".pdf", ".svg")


class InputError(Exception):
    """Bad input; one line naming the problem and the fix."""


def run_folders(paths):
    """The run folders named, or found below the folders named (those holding a metrics.jsonl)."""
    folders = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise InputError(f"{path} is not a folder; give run folders (or folders of runs)")
        found = [path] if (path / "metrics.jsonl").is_file() else sorted(p.parent for p in path.rglob("metrics.jsonl"))
        if not found:
            raise InputError(f"no metrics.jsonl in or below {path}; give the folders train.py wrote")
        folders += found
    return list(dict.fromkeys(folders))


def read_curves(folder):
    """-> {"epoch": [...], "train_loss": [...], "test_error": [...]}, and lr against fractional epochs."""
    epochs, lr = [], []
    for line in (folder / "metrics.jsonl").read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a torn last line
            continue
        kind = row.get("kind") or ("epoch" if "test/acc" in row else "step")
        if kind == "epoch" and "train/loss" in row and "test/error" in row:
            epochs.append(row)
        elif kind == "step" and "lr" in row:
            lr.append((row["step"], row["lr"]))
    if not epochs:
        raise InputError(f"{folder}/metrics.jsonl has no finished epoch yet; nothing to plot")
    steps_per_epoch = epochs[0]["step"] / epochs[0]["epoch"]
    return {"epoch": [r["epoch"] for r in epochs], "train_loss": [r["train/loss"] for r in epochs],
            "test_error": [100 * r["test/error"] for r in epochs],
            "lr_epoch": [s / steps_per_epoch for s, _ in lr], "lr": [v for _, v in lr]}


def experiment(folder):
    return re.sub(r"-seed\d+", "", folder.name)


def plot(folders, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = defaultdict(list)
    for folder in folders:
        groups[experiment(folder)].append(read_curves(folder))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), layout="constrained")
    for (name, runs), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        label = f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        for ax, key in zip(axes[:2], ("train_loss", "test_error")):
            length = min(len(r["epoch"]) for r in runs)  # epochs every seed has reached
            x = runs[0]["epoch"][:length]
            values = [r[key][:length] for r in runs]
            mean = [sum(v) / len(v) for v in zip(*values)]
            ax.plot(x, mean, color=color, label=label)
            if len(runs) > 1:
                ax.fill_between(x, [min(v) for v in zip(*values)], [max(v) for v in zip(*values)], color=color,
                                alpha=0.2, linewidth=0)
        axes[2].plot(runs[0]["lr_epoch"], runs[0]["lr"], color=color, label=label)
    axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="test error (%)", title="test error")
    axes[2].set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    fig.legend(*axes[2].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(groups), 3), fontsize=8)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = OneLineParser(prog="python scripts/plot.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders, or folders of run folders")
    p.add_argument("--out", required=True, help=f"the picture to write ({', '.join(FORMATS)})")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if out.suffix.lower() not in FORMATS:
            raise InputError(f"--out {out}: write a {', '.join(FORMATS)} file")
        if not out.parent.is_dir():
            raise InputError(f"--out {out}: folder {out.parent} does not exist")
        folders = run_folders(args.runs)
        for folder in folders:
            read_curves(folder)  # every run readable before anything is drawn
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plot(folders, out)
    print(f"written: {out} ({len(folders)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
