#!/usr/bin/env bash
# N seeds of one config, queued over the GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

usage() {
    cat <<'USAGE'
usage: scripts/seeds.sh CONFIG [--seeds N] [--out-dir DIR] [--dry-run] [--launcher ...] [-- TRAIN_FLAGS...]

Runs CONFIG with seeds 0..N-1 (default 5), one run per GPU at a time (GPUs from --gpus or
CUDA_VISIBLE_DEVICES; the CPU when neither is set). All runs share the W&B group
seeds-<config>. Re-running skips finished runs and resumes interrupted ones. Flags after --
go to train.py unchanged (but --seed: use --seeds).
USAGE
}

SEEDS=5
SCRIPT_OPTIONS="--seeds"
CONTROLLED="--seed:--seeds"
script_option() {  # OPTION VALUE, for each of SCRIPT_OPTIONS (parse_common)
    case "$1" in
        --seeds) need_count --seeds "$2"; SEEDS=$2 ;;
    esac
}
parse_common "$@"

stem=$(config_stem "$CONFIG")
for ((seed = 0; seed < SEEDS; seed++)); do
    add_run "$stem-seed$seed" --config "$CONFIG" --seed "$seed"
done
run_queue "seeds-$stem"
