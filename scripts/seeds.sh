#!/usr/bin/env bash
# Seeds of one config (the paper reports 5 per cell), one run per GPU at a time.
#   scripts/seeds.sh CONFIG [SWEEP OPTIONS] [-- TRAIN.PY FLAGS]
#   SEEDS="0 1 2" scripts/seeds.sh configs/resnet18_sam.yaml --gpus 0,1 -- --epochs 10
# SEEDS (default "0 1 2 3 4"). Sweep options (--gpus, --out-dir, --dry-run, --launcher slurm, ...):
# python -m engine.sweep --help. Finished runs are skipped, interrupted ones resumed.
set -euo pipefail -o noglob
cd "$(dirname "$0")/.."
[ -f "${1:-}" ] || { echo "error: give a config file first, e.g. scripts/seeds.sh configs/resnet18_sam.yaml" >&2; exit 2; }
config=$1; shift
run() { printf '%q ' "$@"; echo; }  # one train.py command line

runs() {
    for seed in ${SEEDS-0 1 2 3 4}; do
        run --config "$config" --seed "$seed"
    done
}
exec python -m engine.sweep --reads SEEDS --group "seeds-$(basename "$config" .yaml)" "$@" < <(runs)
