#!/usr/bin/env bash
# The SemCKD paper's ImageNet run: ResNet34 -> ResNet18 with SemCKD (-r 1 -a 1 -b 50),
# 90 epochs, batch 256 over 8 GPUs (one process per GPU), DALI GPU data loading, as in the
# README of the SemCKD repo.
#
#   scripts/run_imagenet.sh                       # GPUs 0-7, trial 0
#   scripts/run_imagenet.sh --gpus 0,1,2,3 --trial 1 --dry-run
#   scripts/run_imagenet.sh -- --data_folder /data/imagenet    # flags after -- go to train_student.py
#
# The teacher is torchvision's pretrained ResNet34 wrapped as {'model': state_dict} in
# save/models/ResNet34_vanilla/resnet34_transformed.pth. When that file is missing it is
# made from save/models/ResNet34_vanilla/resnet34-333f7ec4.pth by scripts/model_transform.py;
# that file is downloaded from download.pytorch.org first if absent (TORCHVISION_URL
# overrides the base URL).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
cd "$(dirname "$0")/.." || exit 2
. scripts/sweep_lib.sh

GPUS="0,1,2,3,4,5,6,7"
TRIAL=0
DRY_RUN=0
EXTRA_ARGS=()
TEACHER_DIR=save/models/ResNet34_vanilla
TEACHER="$TEACHER_DIR/resnet34_transformed.pth"
TV_FILE="$TEACHER_DIR/resnet34-333f7ec4.pth"
TV_URL="${TORCHVISION_URL:-https://download.pytorch.org/models}"
TV_URL="${TV_URL%/}/resnet34-333f7ec4.pth"
PY="${PYTHON:-python}"

usage() {
    cat <<EOF
usage: scripts/run_imagenet.sh [--gpus "0,1,...,7"] [--trial ID] [--dry-run] [-- flags for train_student.py]
  --gpus     GPU ids, one training process each (default: $GPUS)
  --trial    trial id (default: 0)
  --dry-run  print the commands instead of running them
Environment: PYTHON (interpreter, default python), TORCHVISION_URL.
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --gpus|--trial)
            if [ $# -lt 2 ]; then echo "error: $1 needs a value" >&2; exit 2; fi
            if [ "$1" = --gpus ]; then GPUS="$(printf '%s' "$2" | tr ' ' ',' | tr -s ',')"; else TRIAL="$2"; fi
            shift 2 ;;
        --) shift; EXTRA_ARGS=("$@"); break ;;
        *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

# shellcheck disable=SC2054  # the commas are part of --gpu_id/--lr_decay_epochs values
cmd=("$PY" train_student.py --path-t "$TEACHER" --model_t ResNet34
     --batch_size 256 --epochs 90 --dataset imagenet --gpu_id "$GPUS" --dist-url tcp://127.0.0.1:23333
     --print-freq 100 --num_workers 32 --distill semckd --model_s ResNet18 -r 1 -a 1 -b 50 --trial "$TRIAL"
     --multiprocessing-distributed --learning_rate 0.1 --lr_decay_epochs 30,60 --weight_decay 1e-4 --dali gpu
     "${EXTRA_ARGS[@]}")

# torchvision's file is a bare state_dict (without BatchNorm's num_batches_tracked); the
# training script wants a {'model': state_dict} that loads with strict=True
wrap_teacher() {
    "$PY" scripts/model_transform.py --model ResNet34 --src "$TV_FILE" --dst "$TEACHER"
}

if [ "$DRY_RUN" -eq 1 ]; then
    if [ ! -f "$TEACHER" ]; then
        [ -f "$TV_FILE" ] || echo "curl -fL -C - -o $TV_FILE $TV_URL"
        shquote "$PY" scripts/model_transform.py --model ResNet34 --src "$TV_FILE" --dst "$TEACHER"
        echo
    fi
    shquote "${cmd[@]}"
    echo
    exit 0
fi

if [ ! -f "$TEACHER" ]; then
    mkdir -p "$TEACHER_DIR"
    if [ ! -f "$TV_FILE" ]; then
        echo "downloading the torchvision ResNet34 weights from $TV_URL"
        if ! curl -fL -C - --connect-timeout 20 -o "$TV_FILE.part" "$TV_URL"; then
            echo "error: could not download $TV_URL (offline?); put the file at $TV_FILE by hand" >&2
            exit 1
        fi
        mv -f "$TV_FILE.part" "$TV_FILE"
    fi
    wrap_teacher || { echo "error: could not make $TEACHER from $TV_FILE" >&2; exit 1; }
fi

mkdir -p save/logs
log="save/logs/imagenet_semckd_ResNet34_ResNet18_trial_${TRIAL}.log"
echo "logging to $log"
echo "# $(shquote "${cmd[@]}")" >> "$log"
"${cmd[@]}" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
