#!/usr/bin/env bash
# rho over the paper's grid on a held-out validation split, as the paper tuned rho.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

usage() {
    cat <<'USAGE'
usage: scripts/sweep_rho.sh CONFIG [--grid "0.01 0.02 0.05 0.1 0.2 0.5"] [--val-split 0.1] [--seed S]
                            [--out-dir DIR] [--dry-run] [--launcher ...] [-- TRAIN_FLAGS...]

Trains CONFIG once per rho of the grid (default: the paper's {0.01, 0.02, 0.05, 0.1, 0.2, 0.5})
with 10% of the training set held out (--val-split), and reports validation accuracy: pick rho
by val/acc, never by test accuracy. One run per GPU at a time; W&B group rho-<config>.
Re-running skips finished runs and resumes interrupted ones. Flags after -- go to train.py.
USAGE
}

GRID="0.01 0.02 0.05 0.1 0.2 0.5"
VAL=0.1
SEED=0
SCRIPT_OPTIONS="--grid --val-split --seed"
CONTROLLED="--seed:--seed --rho:--grid --val-split:--val-split --optimizer:-"
script_option() {  # OPTION VALUE, for each of SCRIPT_OPTIONS (parse_common)
    case "$1" in
        --grid) need_numbers --grid "$2"; GRID=$2 ;;
        --val-split) need_number --val-split "$2"; VAL=$2 ;;
        --seed) need_seed --seed "$2"; SEED=$2 ;;
    esac
}
parse_common "$@"

stem=$(config_stem "$CONFIG")
for rho in $GRID; do
    add_run "$stem-rho$rho-val$VAL-seed$SEED" --config "$CONFIG" --optimizer sam --rho "$rho" \
        --val-split "$VAL" --seed "$SEED"
done
run_queue "rho-$stem"
