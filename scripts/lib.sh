# Shared by the sweep scripts: common flags, and a queue that runs train.py commands one per
# GPU at a time. Source it; do not run it.
#
# A run is a name plus train.py arguments; they follow the flags given after --, so a sweep's own
# values (its rho, its seed) win over them. A run whose folder holds results.json is skipped
# (finished); one whose folder holds last.pt only is resumed (interrupted); failures are
# reported at the end without stopping the other runs. train.py flags given after -- that
# change the experiment are part of every run's name, so a sweep with `-- --model X` never
# shares folders with one without it.

PYTHON=${PYTHON:-python}
OUT_DIR=runs
GPUS=${CUDA_VISIBLE_DEVICES:-}
DRY_RUN=0
EXTRA=()
RUN_NAMES=()
RUN_ARGS=()

# Parses what every script shares: CONFIG (the one positional argument), --gpus, --out-dir,
# --dry-run, --help, and train.py flags after --. The script's own options, named in
# SCRIPT_OPTIONS, all take a value; each goes to the script's `script_option OPTION VALUE`.
parse_common() {
    CONFIG=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --gpus|--out-dir) [[ $# -ge 2 && "$2" != --* ]] || die "option $1 needs a value"
                if [ "$1" = --gpus ]; then GPUS=$2; else OUT_DIR=$2; fi
                shift 2 ;;
            --dry-run) DRY_RUN=1; shift ;;
            --help|-h) usage; exit 0 ;;
            --) shift; EXTRA+=("$@"); break ;;
            -*) [[ " $SCRIPT_OPTIONS " == *" $1 "* ]] || unknown_option "$1"
                [[ $# -ge 2 && "$2" != --* ]] || die "option $1 needs a value"
                script_option "$1" "$2"; shift 2 ;;
            *) [ -z "${FIXED_CONFIG:-}" ] || die "this script takes no CONFIG (it uses $FIXED_CONFIG), got $1"
               [ -z "$CONFIG" ] || die "one CONFIG only, got $CONFIG and $1"; CONFIG=$1; shift ;;
        esac
    done
    CONFIG=${FIXED_CONFIG:-$CONFIG}
    [ -n "$CONFIG" ] || die "missing CONFIG (e.g. configs/wrn28-10_sam.yaml); see --help"
    [ -f "$CONFIG" ] || die "config $CONFIG not found"
    [ -n "$OUT_DIR" ] || die "--out-dir needs a folder"
    [[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus takes GPU indices like 0,1,2, got '$GPUS'"
    NAME_SUFFIX=$(name_suffix "${EXTRA[@]+"${EXTRA[@]}"}")
}

# Checks for the scripts' own option values: one line and exit 2, as train.py does.
need_count() {  # need_count OPTION VALUE: a whole number >= 1
    [[ "$2" =~ ^[0-9]+$ && "$2" -ge 1 ]] || die "$1 takes a whole number >= 1, got '$2'"
}
need_number() {  # need_number OPTION VALUE
    [[ "$2" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || die "$1 takes a non-negative number, got '$2'"
}
need_numbers() {  # need_numbers OPTION "V1 V2 ...": at least one non-negative number
    [ -n "${2// /}" ] || die "$1 needs at least one value"
    local value
    for value in $2; do need_number "$1 value" "$value"; done
}
need_counts() {  # need_counts OPTION "V1 V2 ...": at least one whole number >= 1
    [ -n "${2// /}" ] || die "$1 needs at least one value"
    local value
    for value in $2; do need_count "$1 value" "$value"; done
}
need_seed() {  # need_seed OPTION VALUE: a whole number >= 0
    [[ "$2" =~ ^[0-9]+$ ]] || die "$1 takes a whole number >= 0, got '$2'"
}
need_choice() {  # need_choice OPTION VALUE CHOICE...
    local option=$1 value=$2
    shift 2
    [[ " $* " == *" $value "* ]] || die "$option must be one of: $*; got '$value'"
}

# train.py flags that change how a run is carried out, not what it computes (engine/config.py
# SETTINGS with experiment=False; tests/test_scripts.py checks the two lists agree).
OPERATIONAL_FLAGS=" --data-dir --download --no-download --out-dir --name --device --channels-last --no-channels-last \
--compile --m-sharpness-impl --workers --eval-batch-size --log-every --sharpness-every --wandb-mode --wandb-project --wandb-entity --wandb-group \
--wandb-tags --save-artifact --no-save-artifact "

name_suffix() {  # the experiment-changing train.py flags of "$@", as +flag=value parts of a run name
    local suffix="" flag value
    while [ $# -gt 0 ]; do
        flag=$1
        shift
        [[ "$flag" == --* ]] || continue
        value=""
        if [[ "$flag" == *=* ]]; then
            value=${flag#*=}
            flag=${flag%%=*}
        elif [ $# -gt 0 ] && [[ "$1" != --* ]]; then
            value=$1
            shift
        fi
        [[ "$OPERATIONAL_FLAGS" == *" $flag "* ]] && continue
        suffix+="+${flag#--}${value:+=$value}"
    done
    echo "${suffix//\//_}"
}

unknown_option() { die "unknown option $1 (pass train.py flags after --)"; }

die() { echo "error: $*" >&2; exit 2; }

config_stem() { basename "$1" .yaml; }

add_run() {  # add_run NAME ARGS...
    RUN_NAMES+=("$(run_name "$1")")
    shift
    RUN_ARGS+=("$(printf '%q ' "$@")")
}

run_name() { echo "$1$NAME_SUFFIX"; }  # the folder name of the run a script calls NAME

new_queue() { RUN_NAMES=(); RUN_ARGS=(); }

run_queue() {  # run_queue GROUP
    local group=$1$NAME_SUFFIX n=${#RUN_NAMES[@]} i
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

command_for() {  # the exact train.py command of run i: the flags after --, then the run's own (which win)
    local i=$1 group=" --wandb-group $2" name=${RUN_NAMES[$1]} extra="" tail=""
    [ ${#EXTRA[@]} -eq 0 ] || extra="$(printf '%q ' "${EXTRA[@]}")"
    if [ -f "$OUT_DIR/$name/last.pt" ] && [ ! -f "$OUT_DIR/$name/results.json" ]; then tail=" --resume"; fi
    [[ " ${EXTRA[*]+"${EXTRA[*]}"} " == *" --wandb-mode disabled "* || " ${EXTRA[*]+"${EXTRA[*]}"} " == \
        *" --wandb-mode=disabled "* ]] && group=""  # no W&B, no group
    echo "$PYTHON train.py $extra${RUN_ARGS[$i]}--out-dir $(printf '%q' "$OUT_DIR") --name $(printf '%q' "$name")$group$tail"
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
        # Appended: a retry keeps the log of the attempt that failed.
        echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC') on ${slot}: $cmd" >> "$OUT_DIR/$name/stdout.log"
        if CUDA_VISIBLE_DEVICES=$visible eval "$cmd" >> "$OUT_DIR/$name/stdout.log" 2>&1; then
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
