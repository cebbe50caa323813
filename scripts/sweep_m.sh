#!/usr/bin/env bash
# The paper's m-sharpness study (Foret et al. Section 4.1, Figure 3 middle): m x rho.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

usage() {
    cat <<'USAGE'
usage: scripts/sweep_m.sh CONFIG [--m "16 32 64 128 256"] [--grid "0.01 0.02 0.05 0.1 0.2 0.5"] [--seed S]
                          [--out-dir DIR] [--dry-run] [--launcher ...] [-- TRAIN_FLAGS...]

Trains CONFIG with SAM once per (m, rho): m is --m-sharpness, the number of images that ascend
(and normalise BatchNorm) together; each m must divide the per-process batch. Reports test error
per run; summarise with python scripts/summarize.py OUT_DIR (m shows in the settings column).
One run per GPU at a time; W&B group m-<config>. Re-running skips finished runs and resumes
interrupted ones. Flags after -- go to train.py.
USAGE
}

MS="16 32 64 128 256"
GRID="0.01 0.02 0.05 0.1 0.2 0.5"
SEED=0
SCRIPT_OPTIONS="--m --grid --seed"
CONTROLLED="--seed:--seed --rho:--grid --m-sharpness:--m --optimizer:-"
script_option() {  # OPTION VALUE, for each of SCRIPT_OPTIONS (parse_common)
    case "$1" in
        --m) need_counts --m "$2"; MS=$2 ;;
        --grid) need_numbers --grid "$2"; GRID=$2 ;;
        --seed) need_seed --seed "$2"; SEED=$2 ;;
    esac
}
parse_common "$@"

stem=$(config_stem "$CONFIG")
for m in $MS; do
    for rho in $GRID; do
        add_run "$stem-m$m-rho$rho-seed$SEED" --config "$CONFIG" --optimizer sam --m-sharpness "$m" --rho "$rho" \
            --seed "$SEED"
    done
done
run_queue "m-$stem"
