# Shared by the sweep scripts: common flags, checking every run before any starts, and the two
# launchers: a queue that runs train.py commands one per GPU of this machine at a time (local), or
# one SLURM job per run through submitit (slurm; slurm-local tries the jobs on this machine).
# Source it; do not run it.
#
# A run is a name plus train.py arguments; they follow the flags given after --. Flags after -- that
# a script sets for each run (its seeds, its rho grid...) are refused, with the script's own option to
# use. A run whose folder holds results.json is skipped (finished); one whose folder holds last.pt
# is resumed (interrupted); failures are reported at the end without stopping the other runs.
# train.py flags given after -- that change the experiment are part of every run's name, so a sweep
# with `-- --model X` never shares folders with one without it.

PYTHON=${PYTHON:-python}
OUT_DIR=runs
GPUS=${CUDA_VISIBLE_DEVICES:-}
GPUS_GIVEN=""
DRY_RUN=0
LAUNCHER=local
SLURM_ARGS=()
EXTRA=()
RUN_NAMES=()
RUN_ARGS=()

# Parses what every script shares: CONFIG (the one positional argument), --gpus, --out-dir, the
# launcher and its SLURM options, --dry-run, --help, and train.py flags after --. The script's own
# options, named in SCRIPT_OPTIONS, all take a value; each goes to the script's `script_option OPTION
# VALUE`. CONTROLLED lists "FLAG:OPTION" pairs: train.py flags the script sets per run, and the script
# option that sets them ("-": none, the script fixes the value).
parse_common() {
    CONFIG=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --gpus|--out-dir|--launcher) [[ $# -ge 2 && "$2" != --* ]] || die "option $1 needs a value"
                case "$1" in
                    --gpus) GPUS=$2; GPUS_GIVEN=1 ;;
                    --out-dir) OUT_DIR=$2 ;;
                    --launcher) LAUNCHER=$2 ;;
                esac
                shift 2 ;;
            --partition|--account|--constraint|--gpus-per-run|--time|--slurm-arg)
                [[ $# -ge 2 && "$2" != --* ]] || die "option $1 needs a value"
                SLURM_ARGS+=("$1" "$2"); shift 2 ;;
            --dry-run) DRY_RUN=1; shift ;;
            --help|-h) usage; common_usage; exit 0 ;;
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
    need_choice --launcher "$LAUNCHER" local slurm slurm-local
    if [ "$LAUNCHER" = local ]; then
        [ ${#SLURM_ARGS[@]} -eq 0 ] || die "${SLURM_ARGS[0]} is a SLURM option: add --launcher slurm (or slurm-local)"
        [[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus takes GPU indices like 0,1,2, got '$GPUS'"
        local repeated
        repeated=$(tr ',' '\n' <<< "$GPUS" | sort | uniq -d | head -n 1)
        [ -z "$repeated" ] || die "--gpus lists GPU $repeated twice; list each GPU once (one run per GPU at a time)"
    else
        [ -z "$GPUS_GIVEN" ] || die "--gpus chooses this machine's GPUs for the local queue; under SLURM use --gpus-per-run"
        local i
        for ((i = 0; i < ${#SLURM_ARGS[@]}; i += 2)); do
            case "${SLURM_ARGS[$i]}" in
                --gpus-per-run|--time) need_count "${SLURM_ARGS[$i]}" "${SLURM_ARGS[$((i + 1))]}" ;;
                --slurm-arg) [[ "${SLURM_ARGS[$((i + 1))]}" =~ ^[A-Za-z][A-Za-z0-9_-]*=.* ]] || \
                    die "--slurm-arg takes KEY=VALUE (an sbatch option without its dashes), got '${SLURM_ARGS[$((i + 1))]}'" ;;
            esac
        done
    fi
    check_extra
    NAME_SUFFIX=$(name_suffix "${EXTRA[@]+"${EXTRA[@]}"}")
}

common_usage() {
    cat <<'USAGE'

Options every script takes:
  --out-dir DIR       where run folders go (default runs)
  --dry-run           check every run, then print its command (or, under SLURM, its submitit parameters)
  --launcher local    queue the runs on this machine: --gpus 0,1,... (default: CUDA_VISIBLE_DEVICES, else CPU)
  --launcher slurm    one SLURM job per run, through submitit; preempted or timed-out jobs requeue and
                      resume from their last step. SLURM options: --partition P, --gpus-per-run N (torchrun
                      when N > 1), --time MINUTES (default 1440), --account A, --constraint C, and any other
                      sbatch option as --slurm-arg KEY=VALUE (repeatable). Logs: RUN/slurm/.
  --launcher slurm-local  the same jobs through submitit's local executor, on this machine (a test of the above)
Every run's train.py command is checked first (train.py --check-all): one bad flag or value stops the
script with one error line before any run starts or any folder is made.
USAGE
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

# train.py flags after -- that the queue sets itself, or that this script sets for each run: refused,
# since they would be overridden (or would give every run one folder).
check_extra() {
    local word flag pair option
    for word in "${EXTRA[@]+"${EXTRA[@]}"}"; do
        [[ "$word" == --* ]] || continue
        flag=${word%%=*}
        case "$flag" in
            --out-dir) die "--out-dir after -- is not for train.py here: give the script's own --out-dir (before --)" ;;
            --name) die "--name after -- would put every run in one folder; the script names each run" ;;
            --config) die "--config after --: give the config as the script's CONFIG argument" ;;
            --resume|--allow-changes|--check|--check-all)
                die "$flag after --: the script resumes interrupted runs itself (re-run the same command)" ;;
        esac
        for pair in ${CONTROLLED:-}; do
            [ "$flag" = "${pair%%:*}" ] || continue
            option=${pair#*:}
            [ "$option" = - ] && die "$flag after -- is set by this script for each run; drop it"
            die "$flag after -- is set by this script for each run; use its own $option option instead"
        done
    done
}

# train.py flags that change how a run is carried out, not what it computes (engine/config.py
# SETTINGS with experiment=False; tests/test_scripts.py checks the two lists agree).
OPERATIONAL_FLAGS=" --data-dir --download --no-download --out-dir --name --device --channels-last --no-channels-last \
--compile --m-sharpness-impl --workers --eval-batch-size --log-every --checkpoint-every-min --sharpness-every --wandb-mode --wandb-project --wandb-entity --wandb-group \
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

finished() { [ -f "$OUT_DIR/${RUN_NAMES[$1]}/results.json" ]; }

run_args() {  # run_args I GROUP [fresh]: run I's train.py arguments: the flags after --, then its own
    local i=$1 group=" --wandb-group $2" name=${RUN_NAMES[$1]} extra="" tail=""
    [ ${#EXTRA[@]} -eq 0 ] || extra="$(printf '%q ' "${EXTRA[@]}")"
    if [ -z "${3:-}" ] && [ -f "$OUT_DIR/$name/last.pt" ] && ! finished "$i"; then tail=" --resume"; fi
    [[ " ${EXTRA[*]+"${EXTRA[*]}"} " == *" --wandb-mode disabled "* || " ${EXTRA[*]+"${EXTRA[*]}"} " == \
        *" --wandb-mode=disabled "* ]] && group=""  # no W&B, no group
    echo "$extra${RUN_ARGS[$i]}--out-dir $(printf '%q' "$OUT_DIR") --name $(printf '%q' "$name")$group$tail"
}

command_for() { echo "$PYTHON train.py $(run_args "$1" "$2")"; }  # the exact train.py command of run I

check_queue() {  # check_queue GROUP: train.py --check-all on every unfinished run; its error line, exit 2
    local group=$1$NAME_SUFFIX file i
    file=$(mktemp)
    for ((i = 0; i < ${#RUN_NAMES[@]}; i++)); do
        finished "$i" || run_args "$i" "$group" >> "$file"
    done
    if [ -s "$file" ] && ! "$PYTHON" train.py --check-all "$file" > /dev/null; then
        rm -f "$file"
        exit 2
    fi
    rm -f "$file"
}

run_queue() {  # run_queue GROUP
    local group=$1$NAME_SUFFIX n=${#RUN_NAMES[@]} i
    check_queue "$1"
    if [ "$LAUNCHER" != local ]; then
        for ((i = 0; i < n; i++)); do
            printf '%s\t%s\n' "${RUN_NAMES[$i]}" "$(run_args "$i" "$group" fresh)"
        done | "$PYTHON" -m engine.slurm --launcher "$LAUNCHER" --out-dir "$OUT_DIR" \
            "${SLURM_ARGS[@]+"${SLURM_ARGS[@]}"}" $([ "$DRY_RUN" = 1 ] && echo --dry-run)
        return
    fi
    if [ "$DRY_RUN" = 1 ]; then
        for ((i = 0; i < n; i++)); do
            echo "$(command_for "$i" "$group")"
        done
        return 0
    fi
    local -a slots
    IFS=',' read -r -a slots <<< "$GPUS"
    [ ${#slots[@]} -gt 0 ] || slots=(cpu)
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

worker() {  # worker SLOT GROUP STATE: claims runs until none is left
    local slot=$1 group=$2 state=$3 i name cmd
    local visible=$slot
    [ "$slot" = cpu ] && visible=""
    for ((i = 0; i < ${#RUN_NAMES[@]}; i++)); do
        mkdir "$state/claim-$i" 2>/dev/null || continue  # mkdir is atomic: one worker per run
        name=${RUN_NAMES[$i]}
        if finished "$i"; then
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
