#!/usr/bin/env bash
# rho over the paper's grid on a held-out validation split, as the paper tuned rho.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

usage() {
    cat <<'USAGE'
usage: scripts/sweep_rho.sh CONFIG [--grid "0.01 0.02 0.05 0.1 0.2 0.5"] [--val-split 0.1] [--seed S]
                            [--gpus 0,1,...] [--out-dir DIR] [--dry-run] [-- TRAIN_FLAGS...]

Trains CONFIG once per rho of the grid (default: the paper's {0.01, 0.02, 0.05, 0.1, 0.2, 0.5})
with 10% of the training set held out (--val-split), and reports validation accuracy: pick rho
by val/acc, never by test accuracy. One run per GPU at a time; W&B group rho-<config>.
Re-running skips finished runs and resumes interrupted ones. Flags after -- go to train.py.
USAGE
}

GRID="0.01 0.02 0.05 0.1 0.2 0.5"
VAL=0.1
SEED=0
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
CONFIG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --grid) GRID=$2; shift 2 ;;
        --val-split) VAL=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        -*) die "unknown option $1 (pass train.py flags after --)" ;;
        *) [ -z "$CONFIG" ] || die "one CONFIG only"; CONFIG=$1; shift ;;
    esac
done
[ -n "$CONFIG" ] || die "missing CONFIG (e.g. configs/wrn28-10_sam.yaml); see --help"
[ -f "$CONFIG" ] || die "config $CONFIG not found"

stem=$(config_stem "$CONFIG")
for rho in $GRID; do
    add_run "$stem-rho$rho-val$VAL-seed$SEED" --config "$CONFIG" --optimizer sam --rho "$rho" \
        --val-split "$VAL" --seed "$SEED"
done
run_queue "rho-$stem"
