#!/usr/bin/env bash
# The paper's Table 1 comparison: SGD and SAM, same config and seeds (and, if asked, late-phase SAM).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

usage() {
    cat <<'USAGE'
usage: scripts/sgd_vs_sam.sh CONFIG [--augment basic|cutout|autoaugment|autoaugment_cutout] [--seeds N]
                             [--double-sgd yes|no] [--late-sam EPOCH] [--out-dir DIR] [--dry-run]
                             [--launcher ...] [-- TRAIN_FLAGS...]

Runs CONFIG with --optimizer sam (its rho) and --optimizer sgd, seeds 0..N-1 (default 5),
optionally with another augmentation, one run per GPU at a time, in the W&B group
table1-<config>-<augment>. As in the paper (Section 3.1), SGD also trains for twice the epochs
(--double-sgd no skips that); summarize.py reports SGD's better length, as the paper did.
--late-sam EPOCH adds a third arm: SGD steps until EPOCH, SAM steps from it (--sam-start-epoch;
Zhou et al. 2025), so one command compares SGD, late-phase SAM and SAM over the same seeds.
Summarise with: python scripts/summarize.py OUT_DIR (passes per step beside each error).
Re-running skips finished runs and resumes interrupted ones. Flags after -- go to train.py.
USAGE
}

SEEDS=5
AUGMENT=""
DOUBLE=yes
LATE=""
SCRIPT_OPTIONS="--seeds --augment --double-sgd --late-sam"
CONTROLLED="--seed:--seeds --optimizer:- --augment:--augment --sam-start-epoch:--late-sam"
script_option() {  # OPTION VALUE, for each of SCRIPT_OPTIONS (parse_common)
    case "$1" in
        --seeds) need_count --seeds "$2"; SEEDS=$2 ;;
        --augment) need_choice --augment "$2" basic cutout autoaugment autoaugment_cutout; AUGMENT=$2 ;;
        --double-sgd) need_choice --double-sgd "$2" yes no; DOUBLE=$2 ;;
        --late-sam) need_seed --late-sam "$2"; LATE=$2 ;;
    esac
}
parse_common "$@"

stem=$(config_stem "$CONFIG")
stem=${stem%_sam}
stem=${stem%_sgd}
aug_args=()
[ -z "$AUGMENT" ] || aug_args=(--augment "$AUGMENT")
label=${AUGMENT:-config}
epochs=""
if [ "$DOUBLE" = yes ]; then  # the config's length, with the flags after -- applied
    epochs=$("$PYTHON" -m engine.config epochs --config "$CONFIG" "${EXTRA[@]+"${EXTRA[@]}"}") || exit 2
fi
for ((seed = 0; seed < SEEDS; seed++)); do
    for opt in sgd sam; do
        add_run "$stem-$label-$opt-seed$seed" --config "$CONFIG" --optimizer "$opt" \
            "${aug_args[@]+"${aug_args[@]}"}" --seed "$seed"
    done
    if [ -n "$epochs" ]; then
        add_run "$stem-$label-sgd2x-seed$seed" --config "$CONFIG" --optimizer sgd \
            "${aug_args[@]+"${aug_args[@]}"}" --seed "$seed" --epochs $((2 * epochs))
    fi
    if [ -n "$LATE" ]; then
        add_run "$stem-$label-latesam$LATE-seed$seed" --config "$CONFIG" --optimizer sam --sam-start-epoch "$LATE" \
            "${aug_args[@]+"${aug_args[@]}"}" --seed "$seed"
    fi
done
run_queue "table1-$stem-$label"
