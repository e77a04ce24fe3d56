#!/usr/bin/env bash
# Fetch the published CIFAR-100 teachers into save/models/{name}_vanilla/ckpt_epoch_240.pth.
#
#   scripts/fetch_pretrained_teachers.sh                          # all six teachers
#   scripts/fetch_pretrained_teachers.sh resnet32x4 vgg13         # or only some
#   scripts/fetch_pretrained_teachers.sh --evaluate               # and their CIFAR-100 accuracy
#   scripts/fetch_pretrained_teachers.sh --source repdistiller    # the old per-file server
#
# A thin wrapper: the work is done by scripts/fetch_pretrained_teachers.py (see its --help for the
# sources and the environment: TEACHERS_SOURCE, TEACHERS_URL, TEACHERS_SHA256, TEACHERS_TRUST_PICKLE).
#   PYTHON   interpreter that can import torch and the repo's models/ (default: python, else python3)

# re-run under bash when started as `sh scripts/fetch_pretrained_teachers.sh`
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif command -v python >/dev/null 2>&1; then
    PY=python
else
    PY=python3
fi
exec "$PY" "$(dirname "$0")/fetch_pretrained_teachers.py" "$@"
