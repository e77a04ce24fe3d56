#!/usr/bin/env bash
# The CIFAR-100 distillation sweep of the SemCKD paper: every method with its reference
# loss weights (-r 1 -a 1 -b <per method>) on every teacher/student pair of the paper's
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
# auxiliary resnet8x4_double with PKT (-b 30000), then the auxiliary teaches the student
# with HKD (-b 1). The second pass's run folder is named after its real teacher,
# S:{student}_T:resnet8x4_double_..._hkd_..._{teacher}_{trial}, so that students shared by
# two teachers (vgg8, ShuffleV2) do not collide; scripts/summarize.py files those runs under
# the real teacher. Both passes run in one job, one after the other.

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
cd "$(dirname "$0")/.." || exit 2
. scripts/sweep_lib.sh

# reference -b per method (scripts/run_cifar_distill.sh of the SemCKD repo); -r 1 -a 1 for all
declare -A BETA=(
    [kd]=0 [hint]=100 [attention]=1000 [similarity]=3000 [correlation]=0.02 [vid]=1
    [rkd]=1 [pkt]=30000 [crd]=0.8 [irg]=0.005 [hkd]=1 [semckd]=400
)
ALL_METHODS="kd hint attention similarity correlation vid rkd pkt crd irg hkd semckd"
# teacher:student, in the column order of the paper's table
PAPER_PAIRS="resnet32x4:vgg8 resnet32x4:vgg13 vgg13:ShuffleV2 resnet32x4:ShuffleV2 wrn_40_2:MobileNetV2 vgg13:vgg8 resnet32x4:resnet8x4"
HKD_AUX=resnet8x4_double
HKD_AUX_BETA=30000

usage() {
    cat <<EOF
usage: scripts/run_cifar_distill.sh [--trials "0 1 2"] [--gpus "0,1"|cpu] [--jobs-per-gpu N]
           [--methods "kd semckd ..."] [--pairs "teacher:student ..."] [--teacher NAME=PATH]
           [--force] [--dry-run] [-- flags for train_student.py]
  --trials        trial ids (default: 0)
  --gpus          GPU ids, one job per GPU at a time (default: 0); 'cpu' runs without a GPU
  --jobs-per-gpu  jobs sharing one GPU (default: 1)
  --methods       default: $ALL_METHODS
  --pairs         default: $PAPER_PAIRS
  --teacher       teacher checkpoint for NAME (default save/models/NAME_vanilla/ckpt_epoch_240.pth)
  --force         rerun finished runs too (default: skip them, resume interrupted ones)
  --dry-run       print the commands instead of running them
Environment: PYTHON (interpreter, default python).
EOF
}

METHODS="$ALL_METHODS"
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

for m in $METHODS; do
    if [ -z "${BETA[$m]+set}" ]; then
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

cache_floats "${BETA[@]}" "$HKD_AUX_BETA"

# run folder of train_student.py: S:{s}_T:{t}_{dataset}_{distill}_r:{gamma}_a:{alpha}_b:{beta}_{trial}
student_folder() {  # s t method beta trial
    local name
    name="S:$1_T:$2_${DATASET}_$3_r:1.0_a:1.0_b:$(pyfloat "$4")_$5"
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
                RUN_FOLDER="$(student_folder "$HKD_AUX" "$t" pkt "$HKD_AUX_BETA" "$trial")"
                RUN_PREFIX="$HKD_AUX"
                aux_ckpt="$RUN_FOLDER/${HKD_AUX}_best.pth"
                add_command "$PYTHON_BIN" train_student.py --path-t "$tp" --model_t "$t" --distill pkt \
                    --model_s "$HKD_AUX" -r 1 -a 1 -b "$HKD_AUX_BETA" --trial "$trial"
                students=""
                for p2 in $PAIRS; do
                    [ "${p2%%:*}" = "$t" ] || continue
                    s2="${p2#*:}"
                    students="$students${students:+,}$s2"
                    RUN_FOLDER="$(student_folder "$s2" "$HKD_AUX" hkd "${BETA[hkd]}" "${t}_${trial}")"
                    RUN_PREFIX="$s2"
                    add_command "$PYTHON_BIN" train_student.py --path-t "$aux_ckpt" --model_t "$HKD_AUX" \
                        --distill hkd --model_s "$s2" -r 1 -a 1 -b "${BETA[hkd]}" --trial "${t}_${trial}"
                done
                end_job "hkd $t->{$students} via $HKD_AUX, trial $trial"
                continue
            fi
            RUN_FOLDER="$(student_folder "$s" "$t" "$m" "${BETA[$m]}" "$trial")"
            RUN_PREFIX="$s"
            add_command "$PYTHON_BIN" train_student.py --path-t "$tp" --model_t "$t" --distill "$m" \
                --model_s "$s" -r 1 -a 1 -b "${BETA[$m]}" --trial "$trial"
            end_job "$m $t->$s, trial $trial"
        done
    done
    unset hkd_done
done

run_jobs
