#!/usr/bin/env bash
# The paper's Table 1 comparison: SGD and SAM on the same config and seeds. As in the paper
# (Section 3.1), SGD also trains for twice the epochs; summarize.py reports SGD's better length.
#   scripts/sgd_vs_sam.sh CONFIG [SWEEP OPTIONS] [-- TRAIN.PY FLAGS]
#   AUGMENT=cutout scripts/sgd_vs_sam.sh configs/wrn28-10_sam.yaml --gpus 0,1,2,3
# SEEDS ("0 1 2 3 4"), AUGMENT (the config's), EPOCHS (the config's), DOUBLE_SGD (yes; no skips it),
# LATE_SAM (an epoch: adds late-phase SAM, SGD steps until then; Zhou et al. 2025).
# Then: python scripts/summarize.py OUT_DIR
set -euo pipefail -o noglob
cd "$(dirname "$0")/.."
[ -f "${1:-}" ] || { echo "error: give a config file first, e.g. scripts/sgd_vs_sam.sh configs/wrn28-10_sam.yaml" >&2; exit 2; }
config=$1; shift
run() { printf '%q ' "$@"; echo; }  # one train.py command line
case ${DOUBLE_SGD-yes} in yes|no) ;; *) echo "error: DOUBLE_SGD is yes or no, got '$DOUBLE_SGD'" >&2; exit 2 ;; esac
# the length every run trains (the config's unless EPOCHS), checked before the shell doubles it
epochs=$(python -m engine.config epochs --config "$config" ${EPOCHS:+--epochs "$EPOCHS"})
name=$(basename "$config" .yaml)

runs() {
    for seed in ${SEEDS-0 1 2 3 4}; do
        common=(--config "$config" ${AUGMENT:+--augment "$AUGMENT"} --seed "$seed")
        run "${common[@]}" --optimizer sgd --epochs "$epochs"
        run "${common[@]}" --optimizer sam --epochs "$epochs"
        [ "${DOUBLE_SGD-yes}" = no ] || run "${common[@]}" --optimizer sgd --epochs $((2 * epochs))
        [ -z "${LATE_SAM-}" ] || run "${common[@]}" --optimizer sam --epochs "$epochs" --sam-start-epoch "$LATE_SAM"
    done
}
exec python -m engine.sweep --reads "SEEDS AUGMENT EPOCHS DOUBLE_SGD LATE_SAM" --group "table1-${name%_sam}-${AUGMENT:-config}" "$@" < <(runs)
