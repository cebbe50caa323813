#!/usr/bin/env bash
# rho over the paper's grid, on a held-out validation split: pick rho by val/acc, never by test accuracy.
#   scripts/sweep_rho.sh CONFIG [SWEEP OPTIONS] [-- TRAIN.PY FLAGS]
#   RHOS="0.02 0.05 0.1" scripts/sweep_rho.sh configs/wrn28-10_sam.yaml --gpus 0,1,2
# RHOS (default the paper's "0.01 0.02 0.05 0.1 0.2 0.5"), VAL_SPLIT (0.1), SEED (0).
# Sweep options: python -m engine.sweep --help.
set -euo pipefail -o noglob
cd "$(dirname "$0")/.."
[ -f "${1:-}" ] || { echo "error: give a config file first, e.g. scripts/sweep_rho.sh configs/wrn28-10_sam.yaml" >&2; exit 2; }
config=$1; shift
run() { printf '%q ' "$@"; echo; }  # one train.py command line

runs() {
    for rho in ${RHOS-0.01 0.02 0.05 0.1 0.2 0.5}; do
        run --config "$config" --optimizer sam --rho "$rho" --val-split "${VAL_SPLIT-0.1}" --seed "${SEED-0}"
    done
}
exec python -m engine.sweep --reads "RHOS VAL_SPLIT SEED" --group "rho-$(basename "$config" .yaml)" "$@" < <(runs)
