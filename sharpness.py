"""Measure the sharpness of trained runs (Foret et al. Sections 4.1, 4.2; Figure 1, Figure 3):
Hessian eigenvalues and spectral density, m-sharpness, and loss landscapes.

    python sharpness.py runs/NAME --hessian 5 --density          # top-5 eigenvalues, density plot
    python sharpness.py runs/NAME --m-sharpness 32 --rho 0.05    # m-sharpness at m = 32
    python sharpness.py runs/NAME --landscape 2d                 # filter-normalised 2-D landscape
    python sharpness.py --compare runs/SGD runs/SAM --hessian 5 --landscape 1d 2d interp --out figures/

Everything is measured on a fixed, seeded set of unaugmented training images of the run
(--batches x --batch-size), in float32, with BatchNorm in eval mode (running statistics: the
function the model computes at test time) or, with --bn train, with each batch's own statistics
(the running ones untouched). Results go to sharpness.json and PNG plots in the run folder (or
--out), and, when W&B is on, to the run's own W&B run, resumed by its id: summary values under
sharpness/ and the plots as images.
"""

import signal

if __name__ == "__main__":  # Ctrl-C while Python imports torch: exit now, no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from analysis import figures
from analysis.batches import training_batches
from analysis.hessian import HessianOperator, lanczos_steps, spectral_density, top_eigenvalues
from analysis.landscape import along, filter_normalised_direction, interpolate
from analysis.m_sharpness import m_sharpness
from data import DataError
from engine import checkpoint
from engine.config import FLOAT32_TINY, ConfigError, OneLineParser, refuse
from engine.resume import run_data
from engine.step import resolve_device
from engine.tracker import has_wandb_credentials, wandb_dir, wandb_mode
from sam import frozen_bn_stats


def parse(argv):
    p = OneLineParser(prog="python sharpness.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run folder or checkpoint")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="measure two runs and draw them together")
    p.add_argument("--hessian", type=int, default=0, metavar="K", help="the K largest Hessian eigenvalues (Lanczos)")
    p.add_argument("--lanczos-steps", type=int, default=None, metavar="N",
                   help="Lanczos steps (Hessian-vector products, each over every --batches batch) for --hessian; at "
                        "least K (default: max(3K, K + 30), at most the number of parameters; fewer is cheaper and "
                        "less exact for the smaller of the K)")
    p.add_argument("--density", action="store_true", help="the Hessian's spectral density (stochastic Lanczos "
                                                          "quadrature, Ghorbani et al. 2019)")
    p.add_argument("--density-runs", type=int, help="random start vectors for --density (default: 5)")
    p.add_argument("--density-steps", type=int, help="Lanczos steps per start vector for --density (default: 60)")
    p.add_argument("--m-sharpness", type=int, default=0, metavar="M", help="m-sharpness over groups of M images")
    p.add_argument("--rho", type=float, default=None, help="the ascent radius for --m-sharpness (default: the run's)")
    p.add_argument("--landscape", nargs="+", choices=("1d", "2d", "interp"), default=[], metavar="KIND",
                   help="one or more of: 1d, 2d (loss along filter-normalised random directions), interp (along "
                        "the line between the two --compare runs)")
    p.add_argument("--points", type=int, default=None, help="grid points per axis (default: 25 for 1-D, 11 for 2-D, "
                   "41 for interp); odd, so the trained weights are on the grid (interp: 4k+1, so both runs are)")
    p.add_argument("--span", type=float, help="landscape coordinates run over [-span, span] (default: 1)")
    p.add_argument("--batches", type=int, default=4, help="fixed training batches to measure on (default: 4)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--bn", choices=("eval", "train"), default="eval", help="BatchNorm: running (eval) or batch "
                                                                         "(train) statistics")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, directions and start vectors")
    p.add_argument("--data-dir", help="the data folder, if not the run's")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--out", help="folder for sharpness.json and the plots (default: the run folder)")
    p.add_argument("--wandb-mode", choices=("online", "offline", "disabled"), help="default: as the run")
    args = p.parse_args(argv)
    runs = args.compare or ([args.run] if args.run else [])
    if not runs or (args.run and args.compare):
        raise ConfigError("give one run folder, or --compare RUN_A RUN_B")
    if not (args.hessian or args.density or args.m_sharpness or args.landscape):
        raise ConfigError("nothing to measure: add --hessian K, --density, --m-sharpness M or --landscape")
    if "interp" in args.landscape and not args.compare:
        raise ConfigError("--landscape interp draws the line between two runs: add --compare RUN_A RUN_B")
    if args.compare and not args.out:
        raise ConfigError("--compare needs --out DIR for the shared figures")
    for option, mode, on in (("--lanczos-steps", "--hessian K", args.hessian), ("--density-runs", "--density", args.density),
                             ("--density-steps", "--density", args.density), ("--rho", "--m-sharpness M", args.m_sharpness),
                             ("--points", "--landscape", args.landscape), ("--span", "--landscape", args.landscape)):
        if getattr(args, option[2:].replace("-", "_")) is not None and not on:  # a setting that would do nothing
            raise ConfigError(f"{option} is a setting of {mode}, which this command does not measure: add {mode}, "
                             f"or drop {option}")
    args.density_runs = 5 if args.density_runs is None else args.density_runs
    args.density_steps = 60 if args.density_steps is None else args.density_steps
    args.span = 1.0 if args.span is None else args.span
    for name, value, low in (("--hessian", args.hessian, 0), ("--batches", args.batches, 1),
                             ("--density-runs", args.density_runs, 1), ("--density-steps", args.density_steps, 2),
                             ("--batch-size", args.batch_size, 1), ("--m-sharpness", args.m_sharpness, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if args.lanczos_steps is not None:
        if not max(1, args.hessian) <= args.lanczos_steps <= 10000:
            raise ConfigError(f"--lanczos-steps must be an integer in [{max(1, args.hessian)}, 10000] (at least "
                             f"--hessian {args.hessian}), got {args.lanczos_steps}")
    if args.m_sharpness and args.batch_size % args.m_sharpness:
        raise ConfigError(f"--m-sharpness {args.m_sharpness} must divide --batch-size {args.batch_size}")
    if args.rho is not None and not FLOAT32_TINY <= args.rho < 100:  # below: float32 computes an ascent of 0
        raise ConfigError(f"--rho must be in [{FLOAT32_TINY:.3g}, 100), got {args.rho}")
    if args.points is not None and not 3 <= args.points <= 201:
        raise ConfigError(f"--points must be in [3, 201], got {args.points}")
    if args.points is not None and "interp" in args.landscape and (args.points - 1) % 4:
        raise ConfigError(f"--points {args.points} puts no grid point on the two runs of --landscape interp (alpha 0 "
                          f"and 1 on [-0.5, 1.5]); use 4k+1 points, e.g. {args.points - (args.points - 1) % 4 or 5}")
    if args.points is not None and {"1d", "2d"} & set(args.landscape) and args.points % 2 == 0:
        raise ConfigError(f"--points {args.points} puts no grid point on the trained weights (the centre of "
                          f"[-span, span]); use an odd number, e.g. {args.points + 1}")
    if not 0 < args.span < 1000:  # false for nan too
        raise ConfigError(f"--span must be a number in (0, 1000), got {args.span}")
    if not 0 <= args.seed < 2**32:  # what numpy's and torch's generators take
        raise ConfigError(f"--seed must be in [0, 4294967295], got {args.seed}")
    if args.density_runs > 1000 or args.density_steps > 10000 or args.hessian > 1000:
        raise ConfigError("--hessian, --density-runs and --density-steps are limited to 1000, 1000 and 10000")
    if args.compare and Path(checkpoint.find(args.compare[0])).resolve() == Path(checkpoint.find(args.compare[1])).resolve():
        raise ConfigError(f"--compare needs two different runs, got {args.compare[0]} twice")
    args.device = resolve_device(args.device)
    return args, runs


class Measured:
    """One run's model, its fixed batches and its loss, ready to measure."""

    def __init__(self, run, args):
        device = torch.device(args.device)
        try:
            self.model, self.state, self.path, self.config = checkpoint.load_model(run, device)
        except ValueError as e:
            raise ConfigError(f"{e}; give a run folder or its last.pt") from None
        self.dir, self.name = self.path.parent, self.path.parent.name
        if args.bn == "train" and not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm)
                                          for x in self.model.modules()):
            raise ConfigError(f"--bn train chooses BatchNorm's statistics, and {self.name} ({self.config['model']}, "
                             f"norm {self.config.get('norm')}) has no BatchNorm; drop --bn")
        self.model.train(args.bn == "train")
        try:
            data = run_data(self.config, self.state, args.data_dir, how="point --data-dir at")
        except (ConfigError, DataError) as e:
            raise ConfigError(f"{e}") from None
        try:
            self.batches = training_batches(data, self.config, args.batches, args.batch_size, args.seed, device)
            self.data_note = data.note
        except (DataError, ValueError) as e:
            raise ConfigError(f"{e}") from None
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, batch):
        x, y = batch
        with frozen_bn_stats(self.model):  # batch statistics in train mode, running ones untouched
            return torch.nn.functional.cross_entropy(self.model(x), y)

    def mean_loss(self):
        with torch.no_grad():
            return sum(self.loss(b).item() for b in self.batches) / len(self.batches)


def measure(m, args):
    """-> dict of this run's results."""
    out = {"run": str(m.dir), "epoch": m.state["epoch"], "model": m.config["model"], "loss": m.mean_loss()}
    hessian = HessianOperator(m.loss, m.params, m.batches)
    if args.hessian:
        values = top_eigenvalues(hessian, args.hessian, steps=args.lanczos_steps, seed=args.seed)
        out.update(hessian_eigenvalues=values, lambda_max=values[0],
                   lanczos_steps=lanczos_steps(args.hessian, hessian.size, args.lanczos_steps))
        if len(values) >= 5:
            out["lambda_max_over_lambda_5"] = values[0] / values[4]
    if args.density:
        grid, density = spectral_density(hessian, runs=args.density_runs, steps=args.density_steps, seed=args.seed)
        step = max(1, len(grid) // 400)
        out["density"] = {"lambda": grid[::step].tolist(), "density": density[::step].tolist()}
    if args.m_sharpness:
        rho = args.rho or m.config.get("rho") or 0.05
        groups = [(x[i:i + args.m_sharpness], y[i:i + args.m_sharpness]) for x, y in m.batches
                  for i in range(0, len(y), args.m_sharpness)]
        out["m_sharpness"] = {"m": args.m_sharpness, "rho": rho, "value": m_sharpness(m.loss, m.params, groups, rho)}
    for kind in ("1d", "2d"):
        if kind not in args.landscape:
            continue
        generator = torch.Generator().manual_seed(args.seed)  # the same directions for every run compared
        points = args.points or (25 if kind == "1d" else 11)
        axis = torch.linspace(-args.span, args.span, points).tolist()
        directions = [filter_normalised_direction(m.params, generator) for _ in range(int(kind[0]))]
        coordinates = [(a,) for a in axis] if kind == "1d" else [(a, b) for b in axis for a in axis]
        losses = along(m.mean_loss, m.params, directions, coordinates, desc=f"landscape {kind} {m.name}")
        out[f"landscape_{kind}"] = {"axis": axis, "loss": losses if kind == "1d" else
                                    [losses[i * points:(i + 1) * points] for i in range(points)]}
    return out


def figure_names(args):
    """The PNG files these settings draw (in the order draw() makes them)."""
    return [name for name, wanted in (("hessian_density.png", args.density), ("landscape_1d.png", "1d" in args.landscape),
                                      ("landscape_2d.png", "2d" in args.landscape),
                                      ("interpolation.png", "interp" in args.landscape)) if wanted]


def density_floor(curves):
    """The bottom of the density's log axis: a twentieth of the lowest of its bumps (every Ritz value's
    Gaussian stays in view, and the empty stretches between them do not take the figure)."""
    peaks = []
    for d in curves:
        top = max(d)
        peaks += [v for a, v, b in zip([0.0, *d[:-1]], d, [*d[1:], 0.0]) if v >= a and v >= b and v > top * 1e-15]
    return min(peaks) / 20 if peaks else 1e-12


def draw(results, interp=None):
    """The figures of these results (one run's or two runs' measure() dicts, by name), with the
    interpolation between two runs: -> {file name: matplotlib figure}, not yet saved."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    names = list(results)
    drawn = {}
    with plt.rc_context(figures.RC):
        if all("density" in r for r in results.values()):
            fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
            curves = [results[n]["density"]["density"] for n in names]
            floor = density_floor(curves)
            for i, (name, d) in enumerate(zip(names, curves)):
                ax.plot(results[name]["density"]["lambda"], [max(v, floor / 10) for v in d], label=name,
                        linestyle=figures.STYLES[i % len(figures.STYLES)])
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor, top=max(max(d) for d in curves) * 3)
            ax.yaxis.set_major_formatter(figures.plain_log_formatter())
            ax.yaxis.set_minor_formatter(figures.plain_log_formatter())
            figures.plain(ax.xaxis)
            ax.set(xlabel="eigenvalue", ylabel="density (log scale)", title="Hessian spectral density")
            figures.legend_below(fig, *ax.get_legend_handles_labels(), 6)
            drawn["hessian_density.png"] = fig
        if all("landscape_1d" in r for r in results.values()):
            fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
            for i, name in enumerate(names):
                land = results[name]["landscape_1d"]
                figures.line(ax, land["axis"], land["loss"], label=name, **figures.style(i))
            figures.plain(ax.xaxis)
            scale = figures.log_or_linear(ax, [v for n in names for v in results[n]["landscape_1d"]["loss"]])
            ax.set(xlabel="alpha (filter-normalised direction)", ylabel="training loss" + (
                " (log scale)" if scale == "log" else ""), title="loss landscape, 1-D")
            figures.legend_below(fig, *ax.get_legend_handles_labels(), 6)
            drawn["landscape_1d.png"] = fig
        if all("landscape_2d" in r for r in results.values()):
            landscapes = [results[n]["landscape_2d"] for n in names]
            fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 1.2, 5.0), squeeze=False,
                                     layout="constrained")
            values = [v for land in landscapes for row in land["loss"] for v in row if math.isfinite(v)]
            low = math.floor(10 * min(values)) / 10 if values else 0.0
            top = max(values) if values else 1.0
            high = max(min(top, low + 10), low + 0.1)  # shared levels, clipped for contrast
            levels = MaxNLocator(nbins=20).tick_values(low, high).tolist()  # round values, the first <= the lowest loss
            for ax, name, land in zip(axes[0], names, landscapes):
                filled = ax.contourf(land["axis"], land["axis"], land["loss"], levels=levels, cmap="viridis",
                                     extend="max" if top > levels[-1] else "neither")
                ax.contour(land["axis"], land["axis"], land["loss"], levels=levels, colors="k", linewidths=0.4,
                           alpha=0.5)
                ax.plot([0], [0], marker="x", color="red", markersize=8, markeredgewidth=2, linestyle="none",
                        label="the trained weights (alpha = beta = 0)")
                ax.set(title=figures.wrap(name, 40), xlabel="alpha", ylabel="beta")
                ax.set_box_aspect(1)
                for axis in (ax.xaxis, ax.yaxis):
                    axis.set_major_locator(MaxNLocator(nbins=5))
                    figures.plain(axis)
            bar = fig.colorbar(filled, ax=list(axes[0]), label="training loss" + (
                f" (above {levels[-1]:g}: clipped)" if top > levels[-1] else ""))
            figures.plain(bar.ax.yaxis)
            figures.legend_below(fig, *axes[0][0].get_legend_handles_labels(), 4.2 * len(names) + 1.2)
            drawn["landscape_2d.png"] = fig
        if interp:
            fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
            figures.line(ax, interp["alpha"], interp["loss"], color="C0")
            for alpha, name, look in ((0, names[0], "--"), (1, names[1], ":")):
                ax.axvline(alpha, color="0.35", linestyle=look, linewidth=1.2, label=f"alpha {alpha}: {name}")
            figures.plain(ax.xaxis)
            scale = figures.log_or_linear(ax, interp["loss"])  # trained ends: losses decades under the middle's
            ax.set(xlabel="alpha: the weights (1 - alpha) w_0 + alpha w_1", title="linear interpolation",
                   ylabel="training loss" + (" (log scale)" if scale == "log" else ""))
            figures.legend_below(fig, *ax.get_legend_handles_labels(), 6)
            drawn["interpolation.png"] = fig
    return drawn


def plots(results, out_dir, interp=None):
    """The figures of these results (one run or two), saved to out_dir: -> list of PNG paths."""
    import matplotlib.pyplot as plt
    written = []
    for name, fig in draw(results, interp).items():
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def log_to_wandb(m, results, images, args):
    mode = m.wandb
    if mode == "disabled" or not m.state.get("run_id"):
        return
    import wandb
    run = wandb.init(project=m.config.get("wandb_project"), entity=m.config.get("wandb_entity"),
                     id=m.state["run_id"], resume="allow", mode=mode, dir=str(wandb_dir(m.dir)))
    run.summary.update({f"sharpness/{k}": v for k, v in results.items() if isinstance(v, (int, float))})
    if "m_sharpness" in results:
        run.summary["sharpness/m_sharpness"] = results["m_sharpness"]["value"]
    run.log({f"sharpness/{p.stem}": wandb.Image(str(p)) for p in images})
    run.finish()


def main(argv=None):
    try:
        args, runs = parse(argv)
        outputs = ["sharpness.json", *figure_names(args)]
        if args.out:  # checked before anything is loaded, measured or drawn
            folders = [Path(os.path.realpath(checkpoint.find(run))).parent for run in runs]
            figures.check_output_folder(args.out, outputs, own=folders)
            other = checkpoint.enclosing_run(args.out)
            if other is not None and (args.compare or other != folders[0]):
                raise ConfigError(f"--out {args.out} is {'inside ' if other != Path(os.path.realpath(args.out)) else ''}"
                                 f"run folder {other}, not the run measured here; its records would describe "
                                 f"another run: choose another --out (or leave it out for the measured run's folder)")
        measured = [Measured(run, args) for run in runs]
        for m in measured:  # W&B's mode and credentials, resolved before anything is measured
            m.wandb = args.wandb_mode or wandb_mode(m.config.get("wandb_mode"))
            m.wandb = "offline" if m.wandb == "online" and not has_wandb_credentials() else m.wandb
            if m.wandb != "disabled" and checkpoint.holder(m.dir) is not None:  # W&B writes into the run's wandb/
                raise ConfigError(f"{checkpoint.in_use(m.dir)}; or add --wandb-mode disabled")
        if len(measured) == 2 and measured[0].name == measured[1].name:  # runs/a/x and runs/b/x
            for m in measured:
                m.name = str(m.dir)
        if "interp" in args.landscape and [p.shape for p in measured[0].params] != [p.shape for p in measured[1].params]:
            raise ConfigError(f"--landscape interp needs two runs of one model; got {measured[0].config['model']} and "
                             f"{measured[1].config['model']}")
        out_dir = Path(args.out) if args.out else measured[0].dir
        figures.check_output_folder(out_dir, outputs, own=[m.dir for m in measured])
        out_dir.mkdir(exist_ok=True)
    except (ConfigError, figures.OutputError) as e:
        return refuse(e)
    except OSError as e:
        return refuse(f"cannot write the output folder ({e.strerror}: {e.filename}); choose another --out")
    for note in dict.fromkeys(m.data_note for m in measured if m.data_note):
        print(note, file=sys.stderr)
    results = {m.name: measure(m, args) for m in measured}
    interp = None
    if "interp" in args.landscape:
        a, b = measured
        alphas = torch.linspace(-0.5, 1.5, args.points or 41).tolist()
        weights = [[p.detach().clone() for p in m.params] for m in measured]
        interp = {"alpha": alphas, "loss": interpolate(a.mean_loss, a.params, *weights, alphas, desc="interpolation")}
    images = plots(results, out_dir, interp)
    document = {"settings": {k: getattr(args, k) for k in ("batches", "batch_size", "bn", "seed", "span")},
                **(results[measured[0].name] if len(measured) == 1 else {"runs": results}),
                **({"interpolation": interp} if interp else {})}
    checkpoint.atomic_write(out_dir / "sharpness.json", (json.dumps(document, indent=2) + "\n").encode())
    for m in measured:
        log_to_wandb(m, results[m.name], images, args)
    for name, r in results.items():
        summary = [f"loss {r['loss']:.4f}"]
        if "hessian_eigenvalues" in r:
            summary.append("eigenvalues " + ", ".join(f"{v:.4g}" for v in r["hessian_eigenvalues"]))
        if "lambda_max_over_lambda_5" in r:
            summary.append(f"lambda_max/lambda_5 {r['lambda_max_over_lambda_5']:.3g}")
        if "m_sharpness" in r:
            summary.append(f"m-sharpness {r['m_sharpness']['value']:.4g}")
        print(f"{name}: " + "; ".join(summary))
    print(f"written: {out_dir / 'sharpness.json'}" + "".join(f", {p.name}" for p in images))
    return 0


if __name__ == "__main__":
    from engine.stopping import entry
    sys.exit(entry(main))
