"""Collect finished runs into a Markdown table in the paper's format: test error (%) as mean
± 95% confidence interval over seeds (Student t), per dataset / model / augmentation /
optimizer / rho, and the SGD - SAM difference (Welch interval).

    python scripts/summarize.py runs/                       # results.json files below runs/
    python scripts/summarize.py --wandb-group table1-wrn28-10-basic --wandb-project sam-cifar
    python scripts/summarize.py --wandb-sweep SWEEP_ID --wandb-entity ME
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

# Two-sided 95% Student t quantiles t_{0.975, df}; beyond the table, the normal value.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]
KEY = ("dataset", "model", "augment", "optimizer", "rho")


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


def from_folders(folders, metric):
    runs = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            result = json.loads(path.read_text())
            if result.get(f"{metric}_test_error") is not None:
                runs.append(result)
    return runs


def from_wandb(group, sweep, project, entity, metric):
    import wandb
    path = f"{entity}/{project}" if entity else project
    filters = {"state": "finished", **({"group": group} if group else {}), **({"sweep": sweep} if sweep else {})}
    runs = []
    for run in wandb.Api().runs(path, filters=filters):
        error = run.summary.get(f"{metric}_test_error")
        if error is not None:
            runs.append({**{k: run.config.get(k) for k in KEY}, f"{metric}_test_error": error,
                         "seed": run.config.get("seed")})
    return runs


def fmt(mean, ci):
    return f"{mean:.2f}" if math.isnan(ci) else f"{mean:.2f} ± {ci:.2f}"


def table(runs, metric):
    groups = defaultdict(list)
    for r in runs:
        groups[tuple(r[k] for k in KEY)].append(100 * r[f"{metric}_test_error"])
    order = sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3] != "sgd", k[4]))
    lines = ["| dataset | model | augmentation | optimizer | rho | seeds | test error (%) |",
             "|---|---|---|---|---|---|---|"]
    for key in order:
        dataset, model, augment, optimizer, rho = key
        lines.append(f"| {dataset} | {model} | {augment} | {optimizer.upper()} | "
                     f"{'-' if optimizer == 'sgd' else f'{rho:g}'} | {len(groups[key])} | {fmt(*mean_ci(groups[key]))} |")
    diffs = []
    for key in order:
        if key[3] != "sam":
            continue
        sgd = next((v for k, v in groups.items() if k[:3] == key[:3] and k[3] == "sgd"), None)
        if sgd:
            diffs.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[4]:g} | {fmt(*welch_diff(sgd, groups[key]))} |")
    if diffs:
        lines += ["", "SGD error minus SAM error, percentage points (positive: SAM is better; ± is the "
                      "Welch 95% interval):", "",
                  "| dataset | model | augmentation | rho | SGD - SAM |", "|---|---|---|---|---|", *diffs]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", help="folders searched for results.json files")
    p.add_argument("--metric", choices=("final", "best"), default="final",
                   help="final-epoch error (as the paper reports) or the best epoch's")
    p.add_argument("--wandb-group", help="read the finished runs of this W&B group (scripts/*.sh set one)")
    p.add_argument("--wandb-sweep", help="read the finished runs of this W&B sweep id (wandb agent)")
    p.add_argument("--wandb-project", default="sam-cifar")
    p.add_argument("--wandb-entity")
    args = p.parse_args(argv)
    if not args.folders and not (args.wandb_group or args.wandb_sweep):
        p.error("give result folders, --wandb-group or --wandb-sweep")
    runs = from_folders(args.folders, args.metric) if args.folders else []
    if args.wandb_group or args.wandb_sweep:
        runs += from_wandb(args.wandb_group, args.wandb_sweep, args.wandb_project, args.wandb_entity, args.metric)
    if not runs:
        print("error: no finished runs found (results.json); check the folders or the W&B group", file=sys.stderr)
        return 2
    print(table(runs, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
