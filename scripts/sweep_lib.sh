# Shared by run_cifar_vanilla.sh and run_cifar_distill.sh (sourced, not run): a job queue
# that keeps one job per GPU slot busy, plus helpers that name run folders the way the
# training scripts do, so finished runs are skipped and interrupted ones resumed.
#
# A job is one or more training commands run one after the other on the same GPU (HKD's
# two passes must not be split). Each command carries its run folder and its log file.

JOB_LABELS=()
JOB_LINES=()      # per job: lines "folder<TAB>log<TAB>command"
N_SKIPPED=0

# Python's str(float(x)), which the training scripts use in run folder names (400 -> 400.0).
# cache_floats fills the cache in one interpreter start (call it in the main shell, not in
# a $(...) subshell, which would forget it); pyfloat reads it.
declare -A _PYFLOAT_CACHE=()
cache_floats() {
    local -a out
    read -r -a out <<< "$("${PYTHON_BIN}" -c 'import sys; print(" ".join(str(float(x)) for x in sys.argv[1:]))' "$@")"
    if [ ${#out[@]} -ne $# ]; then
        echo "error: not all of '$*' are numbers" >&2
        exit 2
    fi
    local i=0 v
    for v in "$@"; do _PYFLOAT_CACHE[$v]="${out[$i]}"; i=$((i + 1)); done
}
pyfloat() {
    [ -n "${_PYFLOAT_CACHE[$1]+set}" ] || cache_floats "$1"
    printf '%s' "${_PYFLOAT_CACHE[$1]}"
}

# Shell-quote each argument, leaving plain words (commas, colons included) readable.
shquote() {
    local a text=""
    for a in "$@"; do
        if [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_./:,=@%+~-]+$ && "$a" != "~"* ]]; then
            text+="$a "
        else
            text+="$(printf '%q' "$a") "
        fi
    done
    printf '%s' "${text% }"
}

# The value of flag $1 among the arguments forwarded to the training script, else $2.
extra_value() {
    local key="$1" value="$2" i
    for ((i = 0; i < ${#EXTRA_ARGS[@]}; i++)); do
        case "${EXTRA_ARGS[$i]}" in
            "$key") value="${EXTRA_ARGS[$((i + 1))]:-}" ;;
            "$key"=*) value="${EXTRA_ARGS[$i]#*=}" ;;
        esac
    done
    printf '%s' "$value"
}

# Queue command "$@" (an argv) writing run folder $RUN_FOLDER, as part of the job being
# built in CUR_LINES. A finished run (parameters.json with total_time_s, written at the
# end of training) is skipped unless --force; an interrupted one (a *_last.pth and no
# total_time_s) gets --resume auto. $RUN_PREFIX is the checkpoint prefix (the model name).
add_command() {
    local folder="$RUN_FOLDER" quoted log
    log="save/logs/$(basename "$folder" | tr ':~' '--').log"
    if [ "$FORCE" -eq 0 ] && [ -f "$folder/parameters.json" ] && grep -q '"total_time_s"' "$folder/parameters.json"; then
        N_SKIPPED=$((N_SKIPPED + 1))
        [ "$DRY_RUN" -eq 1 ] && echo "# done already, skipped: $folder"
        return 0
    fi
    quoted="$(shquote "$@")"
    if [ "$FORCE" -eq 0 ] && [ -f "$folder/${RUN_PREFIX}_last.pth" ]; then
        quoted="$quoted --resume auto"
    fi
    if [ ${#EXTRA_ARGS[@]} -gt 0 ]; then
        quoted="$quoted $(shquote "${EXTRA_ARGS[@]}")"
    fi
    CUR_LINES+="$folder"$'\t'"$log"$'\t'"$quoted"$'\n'
}

# Close the job built in CUR_LINES under label $1 (nothing is queued when every command
# in it was skipped).
end_job() {
    if [ -n "$CUR_LINES" ]; then
        JOB_LABELS+=("$1")
        JOB_LINES+=("$CUR_LINES")
    fi
    CUR_LINES=""
}

# "0,1 2" -> "0 1 2"
split_list() {
    printf '%s' "$1" | tr ',' ' ' | xargs
}

# Run one job on GPU $2 (an id for CUDA_VISIBLE_DEVICES; empty means CPU).
_run_job() {
    # exit status 100 + k: command k of the job failed
    local i="$1" gpu="$2" folder log cmd k=0
    export CUDA_VISIBLE_DEVICES="$gpu"
    while IFS=$'\t' read -r folder log cmd; do
        [ -n "$cmd" ] || continue
        {
            echo "# $(date '+%F %T') CUDA_VISIBLE_DEVICES=$gpu"
            echo "# $cmd"
        } >> "$log"
        eval "$cmd" >> "$log" 2>&1 || exit $((100 + k))
        k=$((k + 1))
    done <<< "${JOB_LINES[$i]}"
}

_slots_text() {
    if [ "$GPUS" = cpu ]; then
        echo "${#SLOTS[@]} CPU slot(s)"
    else
        echo "${#SLOTS[@]} slot(s) on GPUs $(split_list "$GPUS")"
    fi
}

# Print the queued jobs (--dry-run), or run them, at most one per GPU slot at a time.
run_jobs() {
    local n=${#JOB_LINES[@]} i
    if [ "$DRY_RUN" -eq 1 ]; then
        echo "# $n job(s) for $(_slots_text); $N_SKIPPED finished run(s) skipped; logs in save/logs/"
        for ((i = 0; i < n; i++)); do
            echo "# job $((i + 1)): ${JOB_LABELS[$i]}"
            while IFS=$'\t' read -r _ _ cmd; do
                [ -n "$cmd" ] && echo "$cmd"
            done <<< "${JOB_LINES[$i]}"
        done
        return 0
    fi
    if [ "$n" -eq 0 ]; then
        echo "nothing to run ($N_SKIPPED finished run(s) skipped; --force reruns them)"
        return 0
    fi
    mkdir -p save/logs

    # each job in its own process group, so an interrupt can stop its training processes
    set -m
    local -a job_of=()
    SLOT_PIDS=()
    local next=0 running=0 ok=0 bad=0 s rc log
    local -a failed=()
    trap '_stop_jobs' INT TERM
    echo "running $n job(s) on $(_slots_text); $N_SKIPPED finished run(s) skipped; logs in save/logs/"
    while [ $next -lt "$n" ] || [ $running -gt 0 ]; do
        for s in "${!SLOTS[@]}"; do
            if [ -n "${SLOT_PIDS[s]:-}" ] && ! kill -0 "${SLOT_PIDS[s]}" 2>/dev/null; then
                wait "${SLOT_PIDS[s]}"
                rc=$?
                i=${job_of[$s]}
                if [ $rc -eq 0 ]; then
                    ok=$((ok + 1))
                    echo "[done] job $((i + 1))/$n ${JOB_LABELS[$i]}"
                else
                    bad=$((bad + 1))
                    failed+=("${JOB_LABELS[$i]}")
                    log=""
                    [ $rc -ge 100 ] && log="$(sed -n "$((rc - 99))p" <<< "${JOB_LINES[$i]}" | cut -f2)"
                    echo "[FAIL] job $((i + 1))/$n ${JOB_LABELS[$i]}; see ${log:-its log in save/logs/}"
                fi
                SLOT_PIDS[s]=""
                running=$((running - 1))
            fi
            if [ -z "${SLOT_PIDS[s]:-}" ] && [ $next -lt "$n" ]; then
                _run_job "$next" "${SLOTS[$s]}" > /dev/null &
                SLOT_PIDS[s]=$!
                job_of[s]=$next
                echo "[start] job $((next + 1))/$n on GPU ${SLOTS[$s]:-cpu}: ${JOB_LABELS[$next]}"
                next=$((next + 1))
                running=$((running + 1))
            fi
        done
        [ $running -gt 0 ] && sleep "${SWEEP_POLL_S:-5}"
    done
    trap - INT TERM
    echo "finished: $ok job(s) ok, $bad failed"
    if [ $bad -gt 0 ]; then
        printf '  failed: %s\n' "${failed[@]}"
        return 1
    fi
    return 0
}

SLOT_PIDS=()
_stop_jobs() {
    local p
    echo "interrupted: stopping the running jobs (finished runs stay; a rerun resumes the others)"
    for p in "${SLOT_PIDS[@]}"; do
        [ -n "$p" ] && kill -TERM -- "-$p" 2>/dev/null
    done
    wait
    exit 130
}

# Parse the options both sweep scripts share; the rest is handled by the caller's
# parse_own_option NAME VALUE (returns 1 when it does not know NAME).
parse_common_options() {
    TRIALS="0"
    GPUS="0"
    JOBS_PER_GPU=1
    DRY_RUN=0
    FORCE=0
    EXTRA_ARGS=()
    while [ $# -gt 0 ]; do
        case "$1" in
            -h|--help) usage; exit 0 ;;
            --dry-run) DRY_RUN=1; shift ;;
            --force) FORCE=1; shift ;;
            --) shift; EXTRA_ARGS=("$@"); break ;;
            --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
            --*)
                if [ $# -lt 2 ]; then echo "error: $1 needs a value" >&2; usage >&2; exit 2; fi
                case "$1" in
                    --trials) TRIALS="$(split_list "$2")" ;;
                    --gpus) GPUS="$2" ;;
                    --jobs-per-gpu) JOBS_PER_GPU="$2" ;;
                    *) parse_own_option "$1" "$2" || { echo "error: unknown option '$1'" >&2; usage >&2; exit 2; } ;;
                esac
                shift 2 ;;
            *) echo "error: unexpected argument '$1' (flags for the training script go after --)" >&2
               usage >&2; exit 2 ;;
        esac
    done
    if [ -z "$TRIALS" ]; then echo "error: --trials is empty; give ids such as \"0 1 2\"" >&2; exit 2; fi
    case "$JOBS_PER_GPU" in
        ''|*[!0-9]*|0) echo "error: --jobs-per-gpu must be a positive integer (got '$JOBS_PER_GPU')" >&2; exit 2 ;;
    esac
    # --gpus cpu: no GPU at all (CUDA_VISIBLE_DEVICES=""), one slot per --jobs-per-gpu
    local g k
    SLOTS=()
    if [ "$GPUS" = cpu ]; then
        for ((k = 0; k < JOBS_PER_GPU; k++)); do SLOTS+=(""); done
    else
        for g in $(split_list "$GPUS"); do
            case "$g" in
                *[!0-9]*) echo "error: --gpus takes GPU ids such as \"0,1\" or 'cpu' (got '$g')" >&2; exit 2 ;;
            esac
            for ((k = 0; k < JOBS_PER_GPU; k++)); do SLOTS+=("$g"); done
        done
        if [ ${#SLOTS[@]} -eq 0 ]; then echo "error: --gpus is empty; give ids such as \"0,1\" or 'cpu'" >&2; exit 2; fi
    fi
    if [ -n "${PYTHON:-}" ]; then
        PYTHON_BIN="$PYTHON"
    elif command -v python >/dev/null 2>&1; then
        PYTHON_BIN=python
    else
        PYTHON_BIN=python3
    fi
}
