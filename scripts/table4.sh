#!/usr/bin/env bash
# The paper's Table 4 (Section 3.3): CIFAR-10 with noisy labels, every cell (configs/labelnoise/).
#   scripts/table4.sh [SWEEP OPTIONS] [-- TRAIN.PY FLAGS]
# SEEDS ("0 1 2"), LEVELS ("0.2 0.4 0.6 0.8"), ALPHAS (Mixup's, "1 8 16 32").
# Stage 1: SGD, Mixup and SAM (rho 0.1; 0.05 at 80%) at every level. Stage 2, the Bootstrap rows:
# each SAM and Mixup run retrained from scratch on the labels it predicts (--relabel-from). A stage-2
# run starts once its source has finished (under SLURM: run this command again then).
# Then: python scripts/summarize.py --table4 OUT_DIR
set -euo pipefail -o noglob
cd "$(dirname "$0")/.."
run() { printf '%q ' "$@"; echo; }  # one train.py command line
sweep() { python -m engine.sweep --reads "SEEDS LEVELS ALPHAS" "$@"; }

bootstrapped() {  # the stage-1 runs that stage 2 learns labels from
    for level in ${LEVELS-0.2 0.4 0.6 0.8}; do
        for seed in ${SEEDS-0 1 2}; do
            sam=configs/labelnoise/sam.yaml
            awk -v p="$level" 'BEGIN { exit !(p + 0 == 0.8) }' && sam=configs/labelnoise/sam_80.yaml  # 0.80, 8e-1 too
            run --config "$sam" --label-noise "$level" --seed "$seed"
            for alpha in ${ALPHAS-1 8 16 32}; do
                run --config configs/labelnoise/mixup.yaml --mixup-alpha "$alpha" --label-noise "$level" --seed "$seed"
            done
        done
    done
}

runs() {
    for level in ${LEVELS-0.2 0.4 0.6 0.8}; do
        for seed in ${SEEDS-0 1 2}; do
            run --config configs/labelnoise/sgd.yaml --label-noise "$level" --seed "$seed"
        done
    done
    bootstrapped
    bootstrapped | sweep --relabelled "$@"  # each line again, with --relabel-from its own run folder
}
exec python -m engine.sweep --reads "SEEDS LEVELS ALPHAS" --group table4 "$@" < <(runs "$@")
