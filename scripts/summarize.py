"""Collect finished runs into a Markdown table in the paper's format: test error (%) as mean
± 95% confidence interval over seeds (Student t), and the SGD - SAM difference (Welch interval).

Runs are grouped by every setting that changes the result (results.json "settings"; all but
the seed), so runs of different experiments are never pooled. Within a group each seed counts
once, and a warning names groups that mix code versions or data. Each row shows every setting in
which it differs from the paper's protocol (a 2-epoch smoke run says so), whether its data is the
official CIFAR release, the forward-backward passes per step it spent (2 for SAM, 1 for SGD, between
for late-phase or randomized SAM), and the paper's Table 1 value where the row is that cell. SAM is
compared with SGD as the paper did (Section 3.1): SGD trained for the same epochs and for twice as
many (scripts/sgd_vs_sam.sh runs both), and the better of them is the baseline; the table says which.
A results.json that cannot be read as a finished run is skipped with a warning naming it.

    python scripts/summarize.py runs/                       # results.json files below runs/
    python scripts/summarize.py --wandb-group table1-wrn28-10-basic --wandb-project sam-cifar
    python scripts/summarize.py --wandb-sweep SWEEP_ID --wandb-entity ME
    python scripts/summarize.py --table4 runs/              # label noise, in the paper's Table 4 layout
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.config import SAM_ONLY, SETTINGS, ConfigError, OneLineParser, path_problem, read, refuse, setting_in_range, \
    shown  # noqa: E402
from engine.tracker import has_wandb_credentials  # noqa: E402
from engine.checkpoint import folder_run_id  # noqa: E402
from models import model_spec  # noqa: E402

# Two-sided 95% Student t quantiles t_{0.975, df}; beyond the table, the normal value.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]
KEY = ("dataset", "model", "augment", "optimizer", "rho")  # the table's own columns
# What "auto" becomes on the paper's hardware path (a GPU): a row shows precision or loader only otherwise.
RESOLVED = {"precision": "bf16", "loader": "device"}
# Foret et al. 2021, Table 1, WRN-28-10 (200 epochs; SGD: the better of 200 and 400): test error (%).
PAPER_TABLE1 = {("cifar10", "basic"): ("3.5 ± 0.1", "2.7 ± 0.1"), ("cifar10", "cutout"): ("2.6 ± 0.1", "2.3 ± 0.1"),
                ("cifar10", "autoaugment"): ("2.3 ± 0.1", "2.1 ± <0.1"),
                ("cifar100", "basic"): ("18.8 ± 0.2", "16.5 ± 0.1"), ("cifar100", "cutout"): ("16.9 ± 0.1", "14.9 ± 0.2"),
                ("cifar100", "autoaugment"): ("15.8 ± 0.2", "13.6 ± 0.2")}
PAPER_RHO = {"cifar10": 0.05, "cifar100": 0.1}


def t975(df):
    return T975[int(df) - 1] if df < len(T975) + 1 else 1.960


def mean_ci(values):
    """-> (mean, half-width of the 95% interval; nan for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t975(n - 1) * math.sqrt(var / n)


def welch_diff(a, b):
    """Mean of a - b and the half-width of its Welch 95% interval."""
    (ma, na), (mb, nb) = (sum(a) / len(a), len(a)), (sum(b) / len(b), len(b))
    if na < 2 or nb < 2:
        return ma - mb, math.nan
    va = sum((v - ma) ** 2 for v in a) / (na - 1) / na
    vb = sum((v - mb) ** 2 for v in b) / (nb - 1) / nb
    if va + vb == 0:
        return ma - mb, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    return ma - mb, t975(math.floor(df)) * math.sqrt(va + vb)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def problem(result, metric):
    """Why `result` is not a finished run's record, or None."""
    if not isinstance(result, dict):
        return f"it holds a {type(result).__name__}, not a mapping"
    error = result.get(f"{metric}_test_error")
    if isinstance(error, bool) or not isinstance(error, (int, float)):
        return f"{metric}_test_error is {error!r}, not a number"
    if not 0 <= error <= 1:  # false for nan too
        return f"{metric}_test_error is {error!r}, not an error rate in [0, 1]"
    settings = result.get("settings", {k: result.get(k) for k in KEY})
    if not isinstance(settings, dict):
        return "its settings are not a mapping"
    for key in ("dataset", "model", "augment", "optimizer"):
        if not isinstance(settings.get(key), str):
            return f"its {key} is {settings.get(key)!r}"
    if not isinstance(settings.get("rho"), (int, float)) or isinstance(settings.get("rho"), bool):
        return f"its rho is {settings.get('rho')!r}"
    if "seed" in result:
        try:
            setting_in_range("seed", result["seed"], "")
        except ConfigError:
            return f"its seed is {result['seed']!r}"
    for key, value in settings.items():  # each a setting train.py has, of a value it could have run with
        if key not in SETTINGS:
            return f"its settings hold {key!r}, which is no setting of train.py"
        try:
            if value is not None:  # null: a setting the run did not use
                setting_in_range(key, value, "")
            if key == "model":
                model_spec(value)
        except (ConfigError, OverflowError, ValueError):
            return f"its {key} is {value!r}"
    passes = result.get("passes_per_step")
    if passes is not None and (isinstance(passes, bool) or not isinstance(passes, (int, float))
                               or not 1 <= passes <= 3):  # false for nan too; an int past float's range too
        return f"its passes_per_step is {passes!r}"
    for key in ("git_commit",):
        if result.get(key) is not None and not isinstance(result[key], str):
            return f"its {key} is {result[key]!r}"
    if result.get("dataset_md5") is not None and not isinstance(result["dataset_md5"], dict):
        return f"its dataset_md5 is {result['dataset_md5']!r}"
    return None


def run_record(result, metric, where):
    """One run: its settings (all that change the result, seed apart), seed, error, provenance."""
    settings = dict(result.get("settings") or {k: result.get(k) for k in KEY})
    settings.pop("seed", None)
    if settings.get("relabel_from"):  # each seed bootstraps from its own run: the setting is "bootstrapped"
        settings["relabel_from"] = "bootstrap"
    passes = result.get("passes_per_step")
    return {"settings": settings, "seed": result.get("seed"), "error": 100 * result[f"{metric}_test_error"],
            "commit": result.get("git_commit"), "data": json.dumps(result.get("dataset_md5"), sort_keys=True),
            "official": result.get("dataset_official"), "where": where,
            "passes": passes if isinstance(passes, (int, float)) and not isinstance(passes, bool) else None}


def from_folders(folders, metric):
    runs = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            try:
                result = json.loads(read(path))
            except (OSError, ValueError, RecursionError) as e:
                warn(f"{path} is unreadable ({type(e).__name__}); skipped")
                continue
            why = problem(result, metric)
            if not why and isinstance(result.get("run_id"), str) and folder_run_id(path.parent) not in (None, result["run_id"]):
                why = f"its run {result['run_id']} is not the run of the folder's config.yaml: copied from another run"
            if why:
                warn(f"{path} is not a finished run's record ({why if len(why) < 120 else why[:117] + '...'}); skipped")
                continue
            runs.append(run_record(result, metric, str(path.parent)))
    return runs


def from_wandb(group, sweep, project, entity, metric):
    import wandb
    path = f"{entity}/{project}" if entity else project
    filters = {"state": "finished", **({"group": group} if group else {}), **({"sweep": sweep} if sweep else {})}
    runs = []
    for run in wandb.Api().runs(path, filters=filters):
        summary = dict(run.summary)
        summary.setdefault("seed", run.config.get("seed"))
        for k in KEY:
            summary.setdefault(k, run.config.get(k))
        why = problem(summary, metric)
        if why:
            warn(f"W&B run {run.url} is not a finished run's record ({why}); skipped")
            continue
        runs.append(run_record(summary, metric, run.url))
    return runs


def fmt(mean, ci):
    return f"{mean:.2f}" if math.isnan(ci) else f"{mean:.2f} ± {ci:.2f}"


def freeze(settings):
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in settings.items()))


def group_runs(runs):
    """-> {frozen settings: [runs, one per seed]}; warns about repeated seeds and mixed provenance."""
    groups = defaultdict(dict)
    for r in runs:
        seeds = groups[freeze(r["settings"])]
        if r["seed"] in seeds:
            warn(f"seed {r['seed']} appears twice in one experiment ({seeds[r['seed']]['where']} and {r['where']}); "
                 f"counted once")
            continue
        seeds[r["seed"]] = r
    for key, seeds in groups.items():
        for what, label in (("commit", "code versions (git commits)"), ("data", "data sets (file checksums)")):
            if len({r[what] for r in seeds.values()}) > 1:
                warn(f"runs of one experiment ({describe(dict(key))}) mix {label}: "
                     f"{', '.join(sorted(r['where'] for r in seeds.values()))}")
    return {key: list(seeds.values()) for key, seeds in groups.items()}


def describe(frozen):
    return ", ".join(f"{k}={v}" for k, v in frozen.items() if k in KEY)


def protocol_differences(settings):
    """The settings of a row that differ from the paper's protocol (the defaults), beyond its columns. A
    null is a setting the run does not use (engine.config.unused): no difference."""
    def paper(k):
        return RESOLVED[k] if k in RESOLVED else SETTINGS[k].default if k in SETTINGS else None
    order = [*[k for k in SETTINGS if k in settings], *sorted(k for k in settings if k not in SETTINGS)]
    return {k: settings[k] for k in order if k not in (*KEY, "seed") and settings[k] is not None
            and settings[k] != paper(k)}


def paper_value(s, other):
    """The paper's Table 1 error for the row's cell, when the row is that cell: its WRN-28-10, its rho,
    nothing else changed (SGD may run twice as long)."""
    cell = PAPER_TABLE1.get((s.get("dataset"), s.get("augment")))
    if not cell or s.get("model") != "sam_wrn28_10":
        return "-"
    if s.get("optimizer") == "sgd" and other in ({}, {"epochs": 400}):
        return cell[0]
    if s.get("optimizer") == "sam" and not other and s.get("rho") == PAPER_RHO[s["dataset"]]:
        return cell[1]
    return "-"


def table(runs):
    groups = group_runs(runs)
    settings = {key: {k: json.loads(v) for k, v in key} for key in groups}
    order = sorted(groups, key=lambda g: (*(str(settings[g].get(k)) for k in KEY[:3]), settings[g].get("optimizer")
                                          != "sgd", str(settings[g].get("rho")), json.dumps(settings[g])))

    def other(g):
        return ", ".join(f"{k}={shown(v)}" for k, v in protocol_differences(settings[g]).items()) or "-"

    def data(g):
        official = {r["official"] for r in groups[g]}
        return "official" if official == {True} else "NOT official" if False in official else "?"

    def passes(g):
        values = [r["passes"] for r in groups[g] if r["passes"] is not None]
        return f"{sum(values) / len(values):.2f}" if len(values) == len(groups[g]) else "-"

    lines = ["| dataset | model | augmentation | optimizer | rho | other settings (vs the paper's) | data | seeds | "
             "passes/step | test error (%) | paper (%) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in order:
        s, errors = settings[g], [r["error"] for r in groups[g]]
        rho = "-" if s.get("optimizer") == "sgd" else f"{s.get('rho'):g}"
        lines.append(f"| {s.get('dataset')} | {s.get('model')} | {s.get('augment')} | {str(s.get('optimizer')).upper()}"
                     f" | {rho} | {other(g)} | {data(g)} | {len(errors)} | {passes(g)} | {fmt(*mean_ci(errors))} | "
                     f"{paper_value(s, protocol_differences(s))} |")
    if any(data(g) != "official" for g in groups):
        lines += ["", "data: NOT official means the files differ from the official CIFAR release (by checksum; e.g. "
                      "the JPEG pack): errors are not comparable with the paper's. ?: not recorded."]

    def baseline_key(g):  # what a SAM run and its SGD baseline share: all but the optimizer and the length
        return {k: v for k, v in settings[g].items() if k not in ("optimizer", "epochs", *SAM_ONLY)}

    diffs = []
    for g in order:
        if settings[g].get("optimizer") != "sam":
            continue
        baselines = [h for h in order if settings[h].get("optimizer") == "sgd" and baseline_key(h) == baseline_key(g)
                     and settings[h].get("epochs") in (settings[g].get("epochs"), 2 * (settings[g].get("epochs") or 0))]
        if baselines:  # the better SGD length, as the paper reports it
            sgd = min(baselines, key=lambda h: mean_ci([r["error"] for r in groups[h]])[0])
            s = settings[g]
            diff = welch_diff([r["error"] for r in groups[sgd]], [r["error"] for r in groups[g]])
            lengths = "/".join(str(settings[h].get("epochs")) for h in baselines)
            diffs.append(f"| {s.get('dataset')} | {s.get('model')} | {s.get('augment')} | {s.get('rho'):g} | "
                         f"{other(g)} | {settings[sgd].get('epochs')} (of {lengths}) | "
                         f"{fmt(*mean_ci([r['error'] for r in groups[sgd]]))} | {fmt(*diff)} |")
    if diffs:
        lines += ["", "SGD error minus SAM error, percentage points (positive: SAM is better; ± is the "
                      "Welch 95% interval). The SGD baseline is the better of its lengths, as in the paper:", "",
                  "| dataset | model | augmentation | rho | other settings | SGD epochs | SGD error (%) | SGD - SAM |",
                  "|---|---|---|---|---|---|---|---|", *diffs]
    return "\n".join(lines)


# Foret et al. 2021, Table 4: test accuracy (%) on CIFAR-10 with 20/40/60/80% noisy labels, ResNet-32.
PAPER_TABLE4 = {"SGD": (84.8, 68.8, 48.2, 26.2), "Mixup": (93.0, 90.0, 83.8, 70.2),
                "Bootstrap + Mixup": (93.3, 92.0, 87.6, 72.0), "SAM": (95.1, 93.4, 90.5, 77.9),
                "Bootstrap + SAM": (95.4, 94.2, 91.8, 79.9)}
LEVELS = (0.2, 0.4, 0.6, 0.8)


def method_of(settings):
    base = "SAM" if settings.get("optimizer") == "sam" else ("Mixup" if settings.get("mixup_alpha") else "SGD")
    return f"Bootstrap + {base}" if settings.get("relabel_from") else base


def table4(runs):
    """Test accuracy (%) per method and noise level, mean ± 95% CI over seeds, beside the paper's;
    the Mixup rows take the best alpha of each level, as the paper reports them."""
    groups = group_runs(runs)
    cells = defaultdict(list)  # (method, level) -> [(mean, ci, alpha, seeds)]
    for key, members in groups.items():
        settings = {k: json.loads(v) for k, v in key}
        if settings.get("label_noise") not in LEVELS:
            continue
        accuracy = [100 - r["error"] for r in members]
        cells[method_of(settings), settings["label_noise"]].append(
            (*mean_ci(accuracy), settings.get("mixup_alpha"), len(members)))
    lines = ["Test accuracy (%) on CIFAR-10 with noisy training labels (Foret et al. Table 4): ours, mean ± 95% "
             "interval over seeds (seeds), beside the paper's.", "",
             "| method | " + " | ".join(f"{int(level * 100)}% noise" for level in LEVELS) + " |",
             "|---|" + "---|" * len(LEVELS)]
    for method, paper in PAPER_TABLE4.items():
        row = []
        for level, published in zip(LEVELS, paper):
            if not cells[method, level]:
                row.append(f"- (paper {published})")
                continue
            mean, ci, alpha, seeds = max(cells[method, level], key=lambda c: c[0])
            best = f", alpha {alpha:g}" if "Mixup" in method else ""
            row.append(f"{fmt(mean, ci)} ({seeds}{best}; paper {published})")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = OneLineParser(prog="python scripts/summarize.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", help="folders searched for results.json files")
    p.add_argument("--metric", choices=("final", "best"), default="final",
                   help="final-epoch error (as the paper reports) or the best epoch's")
    p.add_argument("--wandb-group", help="read the finished runs of this W&B group (scripts/*.sh set one)")
    p.add_argument("--wandb-sweep", help="read the finished runs of this W&B sweep id (wandb agent)")
    p.add_argument("--wandb-project", help=f"where those runs are (default: {SETTINGS['wandb_project'].default})")
    p.add_argument("--wandb-entity", help="whose project it is (default: yours)")
    p.add_argument("--table4", action="store_true", help="label-noise runs in the layout of the paper's Table 4")
    args = p.parse_args(argv)
    if not args.folders and not (args.wandb_group or args.wandb_sweep):
        p.error("give result folders, --wandb-group or --wandb-sweep")
    if (args.wandb_project or args.wandb_entity) is not None and not (args.wandb_group or args.wandb_sweep):
        p.error(f"--wandb-{'project' if args.wandb_project is not None else 'entity'} says where --wandb-group or "
                f"--wandb-sweep reads runs, and neither is given; add one, or drop it")
    for folder in args.folders:
        if path_problem(folder):
            p.error(f"{folder[:80]} {path_problem(folder)}; give a shorter path")
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        p.error(f"{missing[0]} is not a folder; give the folders that hold the runs")
    try:
        credentials = has_wandb_credentials() if args.wandb_group or args.wandb_sweep else True
    except ConfigError as e:
        p.error(str(e))
    if not credentials:
        p.error("reading W&B needs credentials: run `wandb login` or set WANDB_API_KEY (or summarise run folders)")
    runs = from_folders(args.folders, args.metric) if args.folders else []
    if args.wandb_group or args.wandb_sweep:
        try:
            runs += from_wandb(args.wandb_group, args.wandb_sweep, args.wandb_project or SETTINGS["wandb_project"].default,
                               args.wandb_entity, args.metric)
        except Exception as e:  # the network, a project that does not exist: W&B's own error, in one line
            return refuse(f"reading W&B failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); check "
                          f"--wandb-project/--wandb-entity and the network")
    if not runs:
        return refuse("no finished runs found (results.json); check the folders or the W&B group")
    if args.table4 and not any(r["settings"].get("label_noise") in LEVELS for r in runs):
        return refuse(f"--table4: none of the {len(runs)} runs has label noise 0.2, 0.4, 0.6 or 0.8; run "
                      f"scripts/table4.sh, or drop --table4")
    print(table4(runs) if args.table4 else table(runs))
    return 0


if __name__ == "__main__":
    from engine.stopping import entry
    sys.exit(entry(main))
