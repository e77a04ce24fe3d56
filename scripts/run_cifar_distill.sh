#!/usr/bin/env bash
# The CIFAR-100 distillation sweep of the SemCKD paper: every registered method with its
# reference loss weights (-r/-a/-b, declared in the method's file in distiller_zoo/ and
# listed by `python scripts/methods.py`) on every teacher/student pair of the paper's
# table, for each trial id, one job per GPU at a time.
#
#   scripts/run_cifar_distill.sh --trials "0 1 2" --gpus "0,1" --dry-run
#   scripts/run_cifar_distill.sh --trials "0 1 2" --gpus "0,1" --methods "kd semckd" \
#       --pairs "resnet32x4:resnet8x4 vgg13:vgg8"
#   scripts/run_cifar_distill.sh --gpus 0 -- --epochs 1      # flags after -- go to train_student.py
#
# Teachers come from save/models/{name}_vanilla/ckpt_epoch_240.pth
# (scripts/fetch_pretrained_teachers.sh); --teacher NAME=PATH uses another checkpoint.
# A run that already finished is skipped, an interrupted one resumed (--resume auto);
# --force reruns everything. Each run logs to save/logs/<run folder name>.log.
#
# HKD is two passes, as in the reference: the teacher is first distilled into the
# auxiliary resnet8x4_double with PKT (its reference weights), then the auxiliary teaches
# the student with HKD (its own). The second pass's run folder is named after its real teacher,
# S:{student}_T:resnet8x4_double_..._hkd_..._{teacher}_{trial}, so that students shared by
# two teachers (vgg8, ShuffleV2) do not collide; scripts/summarize.py files those runs under
# the real teacher. Both passes run in one job, one after the other.

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
cd "$(dirname "$0")/.." || exit 2
. scripts/sweep_lib.sh

# teacher:student, in the column order of the paper's table
PAPER_PAIRS="resnet32x4:vgg8 resnet32x4:vgg13 vgg13:ShuffleV2 resnet32x4:ShuffleV2 wrn_40_2:MobileNetV2 vgg13:vgg8 resnet32x4:resnet8x4"
HKD_AUX=resnet8x4_double
HKD_AUX_METHOD=pkt

usage() {
    cat <<EOF
usage: scripts/run_cifar_distill.sh [--trials "0 1 2"] [--gpus "0,1"|cpu] [--jobs-per-gpu N]
           [--methods "kd semckd ..."] [--pairs "teacher:student ..."] [--teacher NAME=PATH]
           [--force] [--dry-run] [-- flags for train_student.py]
  --trials        trial ids (default: 0)
  --gpus          GPU ids, one job per GPU at a time (default: 0); 'cpu' runs without a GPU
  --jobs-per-gpu  jobs sharing one GPU (default: 1)
  --methods       default: every registered method (python scripts/methods.py)
  --pairs         default: $PAPER_PAIRS
  --teacher       teacher checkpoint for NAME (default save/models/NAME_vanilla/ckpt_epoch_240.pth)
  --force         rerun finished runs too (default: skip them, resume interrupted ones)
  --dry-run       print the commands instead of running them
Environment: PYTHON (interpreter, default python).
EOF
}

METHODS=""
PAIRS="$PAPER_PAIRS"
declare -A TEACHER_PATH=()
parse_own_option() {
    case "$1" in
        --methods) METHODS="$(split_list "$2")" ;;
        --pairs) PAIRS="$(split_list "$2")" ;;
        --teacher)
            case "$2" in
                ?*=?*) TEACHER_PATH[${2%%=*}]="${2#*=}" ;;
                *) echo "error: --teacher takes NAME=PATH (got '$2')" >&2; exit 2 ;;
            esac ;;
        *) return 1 ;;
    esac
}
parse_common_options "$@"

# every registered method and its reference weights (per pair where a method has its own), from the
# method files, the one place: keys "method *" and "method teacher:student"
declare -A GAMMA=() ALPHA=() BETA=() FLAGS=()
ALL_METHODS=""
table="$("$PYTHON_BIN" -c 'from scripts.methods import main; main(["--weights"])')" || {
    echo "error: could not list the methods with $PYTHON_BIN (set PYTHON to the project's Python)" >&2; exit 2; }
while read -r m pair r a b flags; do
    [ -n "$m" ] || continue
    GAMMA[$m $pair]="$r"; ALPHA[$m $pair]="$a"; BETA[$m $pair]="$b"; FLAGS[$m $pair]="$flags"
    [ "$pair" = '*' ] && ALL_METHODS="$ALL_METHODS${ALL_METHODS:+ }$m"
done <<< "$table"
[ -n "$METHODS" ] || METHODS="$ALL_METHODS"

# the weights key of method $1 for teacher $2 and student $3
wkey() {
    if [ -n "${BETA[$1 $2:$3]+set}" ]; then printf '%s' "$1 $2:$3"; else printf '%s' "$1 *"; fi
}
# train_student.py's weight flags (and per-pair method flags) for method $1, teacher $2, student $3
weight_args() {
    local k
    k="$(wkey "$1" "$2" "$3")"
    printf '%s\n' -r "${GAMMA[$k]}" -a "${ALPHA[$k]}" -b "${BETA[$k]}" ${FLAGS[$k]}
}

for m in $METHODS; do
    if [ -z "${BETA[$m *]+set}" ]; then
        echo "error: unknown method '$m' in --methods; choose from: $ALL_METHODS" >&2
        exit 2
    fi
done
if [ -z "$METHODS" ]; then echo "error: --methods is empty; choose from: $ALL_METHODS" >&2; exit 2; fi
for p in $PAIRS; do
    case "$p" in
        ?*:?*) ;;
        *) echo "error: --pairs takes teacher:student items such as resnet32x4:resnet8x4 (got '$p')" >&2; exit 2 ;;
    esac
done
if [ -z "$PAIRS" ]; then echo "error: --pairs is empty; give teacher:student items" >&2; exit 2; fi

DATASET="$(extra_value --dataset cifar100)"
SAVE_ROOT="$(extra_value --save_root save)"
SAVE_ROOT="${SAVE_ROOT%/}"

teacher_path() {
    printf '%s' "${TEACHER_PATH[$1]:-save/models/$1_vanilla/ckpt_epoch_240.pth}"
}

# every teacher must be there before anything starts
missing=""
for p in $PAIRS; do
    tp="$(teacher_path "${p%%:*}")"
    if [ ! -f "$tp" ]; then
        case " $missing " in *" ${p%%:*} "*) continue ;; esac
        missing="$missing ${p%%:*}"
        if [ "$DRY_RUN" -eq 1 ]; then
            echo "# note: teacher file $tp does not exist yet" >&2
        else
            echo "error: teacher file $tp does not exist; run scripts/fetch_pretrained_teachers.sh ${p%%:*}, or pass --teacher ${p%%:*}=PATH" >&2
        fi
    fi
done
[ -z "$missing" ] || [ "$DRY_RUN" -eq 1 ] || exit 2

cache_floats "${GAMMA[@]}" "${ALPHA[@]}" "${BETA[@]}"

# run folder of train_student.py: S:{s}_T:{t}_{dataset}_{distill}_r:{gamma}_a:{alpha}_b:{beta}_{trial}
student_folder() {  # s t method trial (the method's reference weights for the pair)
    local name k
    k="$(wkey "$3" "$2" "$1")"
    name="S:$1_T:$2_${DATASET}_$3_r:$(pyfloat "${GAMMA[$k]}")_a:$(pyfloat "${ALPHA[$k]}")_b:$(pyfloat "${BETA[$k]}")_$4"
    # the training script writes '~' for ':' on Windows
    if [ ! -d "$SAVE_ROOT/student_model/$name" ] && [ -d "$SAVE_ROOT/student_model/${name//:/\~}" ]; then
        name="${name//:/\~}"
    fi
    printf '%s' "$SAVE_ROOT/student_model/$name"
}

CUR_LINES=""
for trial in $TRIALS; do
    declare -A hkd_done=()
    for p in $PAIRS; do
        t="${p%%:*}"
        s="${p#*:}"
        tp="$(teacher_path "$t")"
        for m in $METHODS; do
            if [ "$m" = hkd ]; then
                # one job per teacher: the auxiliary pass, then HKD for each of its students
                [ -n "${hkd_done[$t]+set}" ] && continue
                hkd_done[$t]=1
                a="$HKD_AUX_METHOD"
                RUN_FOLDER="$(student_folder "$HKD_AUX" "$t" "$a" "$trial")"
                RUN_PREFIX="$HKD_AUX"
                aux_ckpt="$RUN_FOLDER/${HKD_AUX}_best.pth"
                mapfile -t w < <(weight_args "$a" "$t" "$HKD_AUX")
                add_command "$PYTHON_BIN" train_student.py --path-t "$tp" --model_t "$t" --distill "$a" \
                    --model_s "$HKD_AUX" "${w[@]}" --trial "$trial"
                students=""
                for p2 in $PAIRS; do
                    [ "${p2%%:*}" = "$t" ] || continue
                    s2="${p2#*:}"
                    students="$students${students:+,}$s2"
                    RUN_FOLDER="$(student_folder "$s2" "$HKD_AUX" hkd "${t}_${trial}")"
                    RUN_PREFIX="$s2"
                    mapfile -t w < <(weight_args hkd "$HKD_AUX" "$s2")
                    add_command "$PYTHON_BIN" train_student.py --path-t "$aux_ckpt" --model_t "$HKD_AUX" \
                        --distill hkd --model_s "$s2" "${w[@]}" --trial "${t}_${trial}"
                done
                end_job "hkd $t->{$students} via $HKD_AUX, trial $trial"
                continue
            fi
            RUN_FOLDER="$(student_folder "$s" "$t" "$m" "$trial")"
            RUN_PREFIX="$s"
            mapfile -t w < <(weight_args "$m" "$t" "$s")
            add_command "$PYTHON_BIN" train_student.py --path-t "$tp" --model_t "$t" --distill "$m" \
                --model_s "$s" "${w[@]}" --trial "$trial"
            end_job "$m $t->$s, trial $trial"
        done
    done
    unset hkd_done
done

run_jobs
