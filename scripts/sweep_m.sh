#!/usr/bin/env bash
# The paper's m-sharpness study (Section 4.1, Figure 3 middle): m x rho. m images ascend, and
# normalise BatchNorm, together; each m must divide the per-process batch.
#   scripts/sweep_m.sh CONFIG [SWEEP OPTIONS] [-- TRAIN.PY FLAGS]
# MS (default "16 32 64 128 256"), RHOS ("0.01 0.02 0.05 0.1 0.2 0.5"), SEED (0).
# Then: python scripts/summarize.py OUT_DIR (m shows in the settings column).
set -euo pipefail -o noglob
cd "$(dirname "$0")/.."
[ -f "${1:-}" ] || { echo "error: give a config file first, e.g. scripts/sweep_m.sh configs/wrn28-10_sam.yaml" >&2; exit 2; }
config=$1; shift
run() { printf '%q ' "$@"; echo; }  # one train.py command line

runs() {
    for m in ${MS-16 32 64 128 256}; do
        for rho in ${RHOS-0.01 0.02 0.05 0.1 0.2 0.5}; do
            run --config "$config" --optimizer sam --m-sharpness "$m" --rho "$rho" --seed "${SEED-0}"
        done
    done
}
exec python -m engine.sweep --reads "MS RHOS SEED" --group "m-$(basename "$config" .yaml)" "$@" < <(runs)
