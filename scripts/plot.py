"""Training curves of runs, overlaid, from their metrics.jsonl alone (no W&B needed): training loss,
test error and learning rate against epochs. Runs that differ only in their seed (folder names equal
once "-seed<k>" is dropped) are drawn as one curve: the mean over seeds, and a band from the lowest
to the highest seed. The learning rate is drawn per step (against fractional epochs) from the step
records; where config.yaml's cosine schedule (lr, epochs) reproduces every logged value, the curve
is that schedule at every step up to the last one logged (the records are every --log-every steps),
else the records alone. Short series get a marker on each point; the training loss is on a log
axis only when it spans more than a decade.

    python scripts/plot.py runs/sgd-seed0 runs/sam-seed0 --out curves.png
    python scripts/plot.py runs/ --out curves.png          # every run folder below runs/
"""

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis import figures  # noqa: E402
from engine.checkpoint import is_run_folder  # noqa: E402
from engine.config import ConfigError, OneLineParser, read, refuse  # noqa: E402

FORMATS = (".png", ".pdf", ".svg")


def run_folders(paths):
    """The run folders named, or found below the folders named (those holding a metrics.jsonl)."""
    folders = []
    for path in paths:
        path = figures.system_path(path, "run folder")
        if not path.is_dir():
            raise ConfigError(f"{path} is not a folder; give run folders (or folders of runs)")
        found = [path] if (path / "metrics.jsonl").is_file() else sorted(p.parent for p in path.rglob("metrics.jsonl"))
        if not found:
            raise ConfigError(f"no metrics.jsonl in or below {path}; give the folders train.py wrote")
        quiet = [p.name for p in sorted(path.iterdir()) if p.is_dir() and p not in found and is_run_folder(p)]
        if quiet:  # runs that logged no step (refused, or stopped while starting): said, not silently dropped
            print(f"note: {len(quiet)} run folder{'s' * (len(quiet) > 1)} in {path} without metrics.jsonl (no step "
                  f"logged) left out: {', '.join(quiet[:3])}{', ...' if len(quiet) > 3 else ''}", file=sys.stderr)
        folders += found
    return list(dict.fromkeys(folders))


def read_curves(folder):
    """-> {"epoch": [...], "train_loss": [...], "test_error": [...]}, and the logged lr against fractional
    epochs ("lr_epoch", "lr"), and the schedule at every step when it reproduces them ("schedule")."""
    epochs, lr, skipped = [], [], []
    for number, line in enumerate(read(folder / "metrics.jsonl").splitlines(), 1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # a torn last line, or nested past reading
            row = None
        kind = (row.get("kind") or ("epoch" if "test/acc" in row else "step")) if isinstance(row, dict) else None
        if kind == "epoch" and within(row.get("train/loss"), 1e100) and within(row.get("test/error"), 1) and \
                counted(row.get("epoch")) and counted(row.get("step")):
            epochs.append(row)
        elif kind == "step" and within(row.get("lr"), 1e3) and counted(row.get("step"), 0):
            lr.append((row["step"], row["lr"]))
        elif kind not in ("step", "epoch") and isinstance(row, dict) or not line.strip():
            continue  # a row of another kind (sharpness, ...) or an empty line: not a curve's
        else:
            skipped.append(number)  # unreadable, or a curve's row of other values (hand-edited, damaged)
    if skipped:
        lines = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        print(f"warning: {folder / 'metrics.jsonl'}: {len(skipped)} damaged line{'s' * (len(skipped) > 1)} "
              f"({lines}) left out of the plot", file=sys.stderr)
    if not epochs:
        raise ConfigError(f"{folder}/metrics.jsonl has no {'readable' if skipped else 'finished'} epoch"
                         f"{'' if skipped else ' yet'}; nothing to plot")
    steps_per_epoch = epochs[0]["step"] / epochs[0]["epoch"]
    return {"epoch": [r["epoch"] for r in epochs], "train_loss": [r["train/loss"] for r in epochs],
            "test_error": [100 * r["test/error"] for r in epochs],
            "lr_epoch": [s / steps_per_epoch for s, _ in lr], "lr": [v for _, v in lr],
            "schedule": schedule(folder, lr, steps_per_epoch)}


def within(value, most):
    """A number a run logs: a loss, an error rate, a learning rate (0 to `most`; never one whose plotting
    would overflow, nor NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= most


def counted(value, least=1):
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= 10**9


def schedule(folder, logged, steps_per_epoch):
    """train.py's cosine, lr (1 + cos(pi s / T)) / 2 over T = epochs x steps per epoch, from config.yaml, at
    every step s up to the last logged one (at most ~2000 points) -> (fractional epochs, lr), when it
    reproduces every logged lr; else None (a run resumed with a new length or lr, an unreadable config)."""
    try:
        import yaml
        config = yaml.safe_load(read(folder / "config.yaml").decode())
        peak, total = float(config["lr"]), round(float(config["epochs"]) * steps_per_epoch)
    except Exception:  # no config.yaml, or not train.py's
        return None
    if not logged or total <= 0 or steps_per_epoch != int(steps_per_epoch):
        return None

    def lr_at(step):
        return peak * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    if any(not math.isclose(lr_at(s), v, rel_tol=1e-6, abs_tol=1e-9 * peak) for s, v in logged):
        return None
    last = max(s for s, _ in logged)
    steps = sorted({*range(0, last + 1, max(1, last // 2000)), last})
    return [s / steps_per_epoch for s in steps], [lr_at(s) for s in steps]


def experiment(folder):
    return re.sub(r"-seed\d+", "", folder.name)


def common_settings(groups):
    """The '+key=value' parts of a run name that every drawn experiment shares (none for one experiment)."""
    parts = [name.split("+")[1:] for name in groups]
    return [p for p in parts[0] if all(p in other for other in parts[1:])] if len(parts) > 1 else []


WIDTH = 12  # inches: three panels, readable at half this width


def plot(curves, out):
    """Draw the runs' curves ({run folder: read_curves(folder)}) to `out`. -> the figure (closed), for tests."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = defaultdict(list)
    for folder, run in curves.items():
        groups[experiment(folder)].append(run)
    with plt.rc_context(figures.RC):
        fig, axes = plt.subplots(1, 3, figsize=(WIDTH, 4.0), layout="constrained")
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        losses = []
        shared = common_settings(groups)
        for i, (name, runs) in enumerate(groups.items()):
            color, look = colors[i % len(colors)], figures.style(i)
            name = "+".join(part for j, part in enumerate(name.split("+")) if j == 0 or part not in shared)
            label = f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            length = min(len(r["epoch"]) for r in runs)  # epochs every seed has reached
            x = runs[0]["epoch"][:length]
            for ax, key in zip(axes[:2], ("train_loss", "test_error")):
                values = [r[key][:length] for r in runs]
                mean = [sum(v) / len(v) for v in zip(*values)]
                figures.line(ax, x, mean, color=color, label=label, linestyle=look["linestyle"], marker=look["marker"])
                low, high = [min(v) for v in zip(*values)], [max(v) for v in zip(*values)]
                if len(runs) > 1 and length > 1:
                    ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
                elif len(runs) > 1:  # one epoch: the seeds' range as an error bar (a band of one point is nothing)
                    ax.errorbar(x, mean, yerr=[[m - lo for m, lo in zip(mean, low)], [hi - m for m, hi in zip(mean, high)]],
                                color=color, linestyle="none", capsize=4)
                if key == "train_loss":
                    losses += [v for r in values for v in r]
            run = runs[0]  # one seed's schedule: the seeds of an experiment share it
            if run["schedule"]:
                figures.line(axes[2], *run["schedule"], color=color, label=label, linestyle=look["linestyle"],
                             marker=look["marker"])  # a marker on each step, if they are few
                if len(run["schedule"][0]) > figures.FEW and len(run["lr"]) <= figures.FEW:  # where the records are
                    axes[2].plot(run["lr_epoch"], run["lr"], color=color, linestyle="none", marker=look["marker"],
                                 markersize=4.5)
            elif run["lr"]:
                figures.line(axes[2], run["lr_epoch"], run["lr"], color=color, label=label,
                             linestyle=look["linestyle"], marker=look["marker"])
        axes[0].set(xlabel="epoch", ylabel="training loss", title="training loss")
        figures.log_or_linear(axes[0], losses)
        axes[1].set(xlabel="epoch", ylabel="test error (%)", title="test error")
        axes[2].set(xlabel="epoch", ylabel="learning rate", title="learning rate (per step)")
        for ax in axes:
            figures.integer_ticks(ax.xaxis)
        for ax in axes[1:]:
            figures.plain(ax.yaxis)
        if shared:  # said once, not in every legend entry
            fig.suptitle("all runs: " + ", ".join(shared), fontsize="medium")
        figures.legend_below(fig, *axes[0].get_legend_handles_labels(), WIDTH)
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig


def main(argv=None):
    p = OneLineParser(prog="python scripts/plot.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders, or folders of run folders")
    p.add_argument("--out", required=True, help=f"the picture to write ({', '.join(FORMATS)})")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        folders = run_folders(args.runs)
        figures.check_output_file(out, own=folders, formats=FORMATS)  # before any run is read or anything drawn
        curves = {folder: read_curves(folder) for folder in folders}  # every run readable before anything is drawn
    except (ConfigError, figures.OutputError, OSError) as e:
        return refuse(e)
    try:
        plot(curves, out)
    except OSError as e:  # the disk filled, the folder went away
        return refuse(f"cannot write {out} ({e.strerror or e}); choose another --out")
    print(f"written: {out} ({len(folders)} run(s))")
    return 0


if __name__ == "__main__":
    from engine.stopping import entry
    sys.exit(entry(main))
