#!/usr/bin/env bash
# The paper's Table 1 comparison: SGD and SAM, same config and seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

usage() {
    cat <<'USAGE'
usage: scripts/sgd_vs_sam.sh CONFIG [--augment basic|cutout|autoaugment] [--seeds N]
                             [--gpus 0,1,...] [--out-dir DIR] [--dry-run] [-- TRAIN_FLAGS...]

Runs CONFIG with --optimizer sgd and --optimizer sam (its rho), seeds 0..N-1 (default 5),
optionally with another augmentation, one run per GPU at a time, in the W&B group
table1-<config>-<augment>. Summarise with: python scripts/summarize.py OUT_DIR.
Re-running skips finished runs and resumes interrupted ones. Flags after -- go to train.py.
USAGE
}

SEEDS=5
AUGMENT=""
SCRIPT_OPTIONS="--seeds --augment"
parse_common "$@"
set -- "${OPTIONS[@]+"${OPTIONS[@]}"}"
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) SEEDS=$2 ;;
        --augment) AUGMENT=$2 ;;
    esac
    shift 2
done

stem=$(config_stem "$CONFIG")
stem=${stem%_sam}
stem=${stem%_sgd}
aug_args=()
[ -z "$AUGMENT" ] || aug_args=(--augment "$AUGMENT")
label=${AUGMENT:-config}
for ((seed = 0; seed < SEEDS; seed++)); do
    for opt in sgd sam; do
        add_run "$stem-$label-$opt-seed$seed" --config "$CONFIG" --optimizer "$opt" \
            "${aug_args[@]+"${aug_args[@]}"}" --seed "$seed"
    done
done
run_queue "table1-$stem-$label"
