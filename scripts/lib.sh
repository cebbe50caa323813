# Shared by the sweep scripts: common flags, and a queue that runs train.py commands one per
# GPU at a time. Source it; do not run it.
#
# A run is a name plus train.py arguments. A run whose folder holds results.json is skipped
# (finished); one whose folder holds last.pt only is resumed (interrupted); failures are
# reported at the end without stopping the other runs.

PYTHON=${PYTHON:-python}
OUT_DIR=runs
GPUS=${CUDA_VISIBLE_DEVICES:-}
DRY_RUN=0
EXTRA=()
RUN_NAMES=()
RUN_ARGS=()

# Parses what every script shares: CONFIG (the one positional argument), --gpus, --out-dir,
# --dry-run, --help, and train.py flags after --. The script's own options, named in
# SCRIPT_OPTIONS, all take a value; they come back in OPTIONS as name/value pairs.
parse_common() {
    CONFIG=""
    OPTIONS=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --gpus) GPUS=$2; shift 2 ;;
            --out-dir) OUT_DIR=$2; shift 2 ;;
            --dry-run) DRY_RUN=1; shift ;;
            --help|-h) usage; exit 0 ;;
            --) shift; EXTRA+=("$@"); break ;;
            -*) [[ " $SCRIPT_OPTIONS " == *" $1 "* ]] || unknown_option "$1"
                [ $# -ge 2 ] || die "option $1 needs a value"
                OPTIONS+=("$1" "$2"); shift 2 ;;
            *) [ -z "$CONFIG" ] || die "one CONFIG only, got $CONFIG and $1"; CONFIG=$1; shift ;;
        esac
    done
    [ -n "$CONFIG" ] || die "missing CONFIG (e.g. configs/wrn28-10_sam.yaml); see --help"
    [ -f "$CONFIG" ] || die "config $CONFIG not found"
}

unknown_option() { die "unknown option $1 (pass train.py flags after --)"; }

die() { echo "error: $*" >&2; exit 2; }

config_stem() { basename "$1" .yaml; }

add_run() {  # add_run NAME ARGS...
    RUN_NAMES+=("$1")
    shift
    RUN_ARGS+=("$(printf '%q ' "$@")")
}

run_queue() {  # run_queue GROUP
    local group=$1 n=${#RUN_NAMES[@]} i
    local -a slots
    IFS=',' read -r -a slots <<< "$GPUS"
    [ ${#slots[@]} -gt 0 ] || slots=(cpu)
    if [ "$DRY_RUN" = 1 ]; then
        for ((i = 0; i < n; i++)); do
            echo "$(command_for "$i" "$group")"
        done
        return 0
    fi
    local state
    state=$(mktemp -d)
    local slot pids=()
    for slot in "${slots[@]}"; do
        worker "$slot" "$group" "$state" &
        pids+=($!)
    done
    wait "${pids[@]}" || true
    report "$state"
}

command_for() {  # the exact train.py command of run i
    local i=$1 group=$2 name=${RUN_NAMES[$1]} tail=""
    if [ -f "$OUT_DIR/$name/last.pt" ] && [ ! -f "$OUT_DIR/$name/results.json" ]; then tail=" --resume"; fi
    [ ${#EXTRA[@]} -eq 0 ] || tail="$tail $(printf '%q ' "${EXTRA[@]}")"
    echo "$PYTHON train.py ${RUN_ARGS[$i]}--out-dir $(printf '%q' "$OUT_DIR") --name $name --wandb-group $group$tail" \
        | sed 's/ *$//'
}

worker() {  # worker SLOT GROUP STATE: claims runs until none is left
    local slot=$1 group=$2 state=$3 i name cmd
    local visible=$slot
    [ "$slot" = cpu ] && visible=""
    for ((i = 0; i < ${#RUN_NAMES[@]}; i++)); do
        mkdir "$state/claim-$i" 2>/dev/null || continue  # mkdir is atomic: one worker per run
        name=${RUN_NAMES[$i]}
        if [ -f "$OUT_DIR/$name/results.json" ]; then
            echo "skip $name (finished)" | tee -a "$state/skipped"
            continue
        fi
        cmd=$(command_for "$i" "$group")
        mkdir -p "$OUT_DIR/$name"
        echo "[${slot}] start $name"
        if CUDA_VISIBLE_DEVICES=$visible eval "$cmd" > "$OUT_DIR/$name/stdout.log" 2>&1; then
            echo "[${slot}] done  $name"
            echo "$name" >> "$state/done"
        else
            echo "[${slot}] FAIL  $name (exit $?; log: $OUT_DIR/$name/stdout.log)"
            echo "$name" >> "$state/failed"
        fi
    done
}

report() {
    local state=$1 done_n=0 failed_n=0 skipped_n=0
    [ -f "$state/done" ] && done_n=$(wc -l < "$state/done")
    [ -f "$state/skipped" ] && skipped_n=$(wc -l < "$state/skipped")
    [ -f "$state/failed" ] && failed_n=$(wc -l < "$state/failed")
    echo "finished: $done_n run(s), skipped (already finished): $skipped_n, failed: $failed_n"
    if [ "$failed_n" -gt 0 ]; then
        sed 's/^/  failed: /' "$state/failed"
        echo "re-run the same command to retry the failed runs (finished ones are skipped)"
        return 1
    fi
}
