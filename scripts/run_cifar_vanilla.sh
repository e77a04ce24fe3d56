#!/usr/bin/env bash
# Train networks on CIFAR-100 with cross-entropy alone (train_teacher.py): the reference
# teachers and the "Student alone" baselines of the SemCKD paper's table, for each trial id,
# one job per GPU at a time.
#
#   scripts/run_cifar_vanilla.sh --trials "0 1 2" --gpus "0,1" --models students --dry-run
#   scripts/run_cifar_vanilla.sh --trials 0 --gpus 0 --models "resnet32x4 vgg13"
#   scripts/run_cifar_vanilla.sh --gpus 0 -- --epochs 1       # flags after -- go to train_teacher.py
#
# Runs land in save/models/{model}_{dataset}_lr_{lr}_decay_{wd}_trial_{trial}/ and log to
# save/logs/. A run that already finished is skipped, an interrupted one resumed
# (--resume auto); --force reruns everything.

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
cd "$(dirname "$0")/.." || exit 2
. scripts/sweep_lib.sh

# the reference teachers (scripts/run_cifar_vanilla.sh of the SemCKD repo)
TEACHERS="wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50"
# the students of the paper's table
STUDENTS="vgg8 vgg13 ShuffleV2 MobileNetV2 resnet8x4"
# train_teacher.py's default learning rate is 0.01 for these, 0.05 for the others
LOW_LR="MobileNetV2 ShuffleV1 ShuffleV2"

usage() {
    cat <<EOF
usage: scripts/run_cifar_vanilla.sh [--trials "0 1 2"] [--gpus "0,1"|cpu] [--jobs-per-gpu N]
           [--models "students teachers NAME ..."] [--force] [--dry-run] [-- flags for train_teacher.py]
  --trials        trial ids (default: 0)
  --gpus          GPU ids, one job per GPU at a time (default: 0); 'cpu' runs without a GPU
  --jobs-per-gpu  jobs sharing one GPU (default: 1)
  --models        model names, or 'students' ($STUDENTS)
                  and 'teachers' ($TEACHERS); default: students teachers
  --force         rerun finished runs too (default: skip them, resume interrupted ones)
  --dry-run       print the commands instead of running them
Environment: PYTHON (interpreter, default python).
EOF
}

MODELS_ARG="students teachers"
parse_own_option() {
    case "$1" in
        --models) MODELS_ARG="$(split_list "$2")" ;;
        *) return 1 ;;
    esac
}
parse_common_options "$@"

MODELS=""
for m in $MODELS_ARG; do
    case "$m" in
        students) items="$STUDENTS" ;;
        teachers) items="$TEACHERS" ;;
        *) items="$m" ;;
    esac
    for x in $items; do
        case " $MODELS " in *" $x "*) ;; *) MODELS="$MODELS $x" ;; esac
    done
done
MODELS="$(split_list "$MODELS")"
if [ -z "$MODELS" ]; then echo "error: --models is empty; give names, 'students' or 'teachers'" >&2; exit 2; fi

DATASET="$(extra_value --dataset cifar100)"
SAVE_ROOT="$(extra_value --save_root save)"
SAVE_ROOT="${SAVE_ROOT%/}"
WD="$(extra_value --weight_decay 5e-4)"
LR_FLAG="$(extra_value --learning_rate "")"
cache_floats "$WD" 0.05 0.01 ${LR_FLAG:+"$LR_FLAG"}

CUR_LINES=""
for trial in $TRIALS; do
    for model in $MODELS; do
        lr="${LR_FLAG:-0.05}"
        if [ -z "$LR_FLAG" ]; then
            case " $LOW_LR " in *" $model "*) lr=0.01 ;; esac
        fi
        RUN_FOLDER="$SAVE_ROOT/models/${model}_${DATASET}_lr_$(pyfloat "$lr")_decay_$(pyfloat "$WD")_trial_${trial}"
        RUN_PREFIX="$model"
        add_command "$PYTHON_BIN" train_teacher.py --model "$model" --trial "$trial"
        end_job "$model, trial $trial"
    done
done

run_jobs
