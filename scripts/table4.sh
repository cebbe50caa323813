#!/usr/bin/env bash
# The paper's Table 4: label noise, every cell (Foret et al. Section 3.3).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

usage() {
    cat <<'USAGE'
usage: scripts/table4.sh [--seeds N] [--levels "0.2 0.4 0.6 0.8"] [--alphas "1 8 16 32"]
                         [--out-dir DIR] [--dry-run] [--launcher ...] [-- TRAIN_FLAGS...]

Trains Table 4 of the paper on CIFAR-10 with noisy labels (configs/labelnoise/), seeds 0..N-1
(default 3), in two stages:
  1. SGD, Mixup (each alpha of --alphas) and SAM (rho 0.1; 0.05 at 80%) at every level;
  2. Bootstrap + Mixup and Bootstrap + SAM: each retrains from scratch on the labels its stage-1
     run (same level, seed and alpha) predicts for the training images (--relabel-from).
Stage 2 starts when stage 1 is done (under SLURM: run the same command again once stage 1's jobs
have finished). One run per GPU at a time; W&B group table4. Re-running skips finished runs and
resumes interrupted ones. Flags after -- go to train.py.
Then: python scripts/summarize.py --table4 OUT_DIR prints the table beside the paper's numbers.
USAGE
}

FIXED_CONFIG=configs/labelnoise/base.yaml
SEEDS=3
LEVELS="0.2 0.4 0.6 0.8"
ALPHAS="1 8 16 32"
SCRIPT_OPTIONS="--seeds --levels --alphas"
CONTROLLED="--seed:--seeds --label-noise:--levels --mixup-alpha:--alphas --relabel-from:- --optimizer:- --rho:-"
script_option() {  # OPTION VALUE, for each of SCRIPT_OPTIONS (parse_common)
    case "$1" in
        --seeds) need_count --seeds "$2"; SEEDS=$2 ;;
        --levels) need_numbers --levels "$2"; LEVELS=$2 ;;
        --alphas) need_numbers --alphas "$2"; ALPHAS=$2 ;;
    esac
}
parse_common "$@"

sam_config() { if [ "$1" = 0.8 ]; then echo configs/labelnoise/sam_80.yaml; else echo configs/labelnoise/sam.yaml; fi; }

queue_stage() {  # queue_stage 1|2 [unlinked]: that stage's runs; unlinked: stage 2 without --relabel-from
    local stage=$1 unlinked=${2:-} level seed alpha
    new_queue
    for level in $LEVELS; do
        for ((seed = 0; seed < SEEDS; seed++)); do
            common=(--label-noise "$level" --seed "$seed")
            if [ "$stage" = 1 ]; then
                add_run "t4-noise$level-sgd-seed$seed" --config configs/labelnoise/sgd.yaml "${common[@]}"
                add_run "t4-noise$level-sam-seed$seed" --config "$(sam_config "$level")" "${common[@]}"
                for alpha in $ALPHAS; do
                    add_run "t4-noise$level-mixup-a$alpha-seed$seed" --config configs/labelnoise/mixup.yaml \
                        --mixup-alpha "$alpha" "${common[@]}"
                done
            else
                source_of() { [ -n "$unlinked" ] || echo --relabel-from "$OUT_DIR/$(run_name "$1")"; }
                # shellcheck disable=SC2046
                add_run "t4-noise$level-bootstrap-sam-seed$seed" --config "$(sam_config "$level")" "${common[@]}" \
                    $(source_of "t4-noise$level-sam-seed$seed")
                for alpha in $ALPHAS; do
                    # shellcheck disable=SC2046
                    add_run "t4-noise$level-bootstrap-mixup-a$alpha-seed$seed" --config configs/labelnoise/mixup.yaml \
                        --mixup-alpha "$alpha" "${common[@]}" $(source_of "t4-noise$level-mixup-a$alpha-seed$seed")
                done
            fi
        done
    done
}

# Every run is checked before any starts; stage 2's sources do not exist yet, so its runs are
# checked without them here, and with them when stage 2 starts.
queue_stage 2 unlinked
check_queue table4
queue_stage 1
stage_one=("${RUN_NAMES[@]}")
stage_one_done() {
    local name
    for name in "${stage_one[@]}"; do [ -f "$OUT_DIR/$name/results.json" ] || return 1; done
}

failed=0
for stage in 1 2; do
    queue_stage "$stage"
    if [ "$stage" = 2 ] && ! stage_one_done; then
        if [ "$DRY_RUN" = 1 ]; then  # stage 2's commands, whose sources stage 1 will train
            for ((i = 0; i < ${#RUN_NAMES[@]}; i++)); do echo "$(command_for "$i" "table4$NAME_SUFFIX")"; done
        else
            echo "stage 2 waits for every stage-1 run to finish: run this command again when they have"
            [ "$LAUNCHER" != local ] || failed=1
        fi
        continue
    fi
    [ "$DRY_RUN" = 1 ] || [ "$LAUNCHER" != local ] || echo "stage $stage of 2"
    run_queue table4 || failed=1
done
exit $failed
