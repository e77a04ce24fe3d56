#!/usr/bin/env bash
# Fetch the published CIFAR-100 teachers (trained by the RepDistiller authors, used by the
# SemCKD paper) into save/models/{name}_vanilla/ckpt_epoch_240.pth.
#
#   scripts/fetch_pretrained_teachers.sh                 # all six teachers
#   scripts/fetch_pretrained_teachers.sh resnet32x4 vgg13
#
# Environment:
#   TEACHERS_URL     base URL (default http://shape2prog.csail.mit.edu/repo); the file of
#                    teacher NAME is $TEACHERS_URL/NAME_vanilla/ckpt_epoch_240.pth
#   TEACHERS_SHA256  optional file of "sha256  NAME" (or "sha256  NAME_vanilla/ckpt_epoch_240.pth")
#                    lines, the format sha256sum prints. No checksums are published for these
#                    files, so by default a download is checked only by loading it into the
#                    repo's model of that name with strict=True.
#   PYTHON           interpreter that can import torch and the repo's models/ (default: python,
#                    else python3)
#   TEACHERS_TRUST_PICKLE=1  load with torch.load(weights_only=False); by default files are
#                    loaded with weights_only=True, so a download cannot run code
#
# Downloads resume (curl -C -), files already present and valid are skipped, and a file
# that fails verification is never left where the training scripts look for teachers.
# Exit status: 0 when every requested teacher is present and valid, 1 when any failed,
# 2 on bad usage.

# re-run under bash when started as `sh scripts/fetch_pretrained_teachers.sh`
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

ALL_TEACHERS="wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50"
BASE_URL="${TEACHERS_URL:-http://shape2prog.csail.mit.edu/repo}"
BASE_URL="${BASE_URL%/}"
SHA_FILE="${TEACHERS_SHA256:-}"

# paths below are relative to the repo root, wherever the script is started from
cd "$(dirname "$0")/.." || exit 2
REPO_ROOT="$(pwd)"

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif command -v python >/dev/null 2>&1; then
    PY=python
else
    PY=python3
fi

usage() {
    echo "usage: $0 [NAME ...]   (names: $ALL_TEACHERS; default all)"
}

names=()
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option '$arg'"; usage; exit 2 ;;
    esac
    case " $ALL_TEACHERS " in
        *" $arg "*) names+=("$arg") ;;
        *) echo "error: unknown teacher '$arg'; choose from: $ALL_TEACHERS"; exit 2 ;;
    esac
done
if [ ${#names[@]} -eq 0 ]; then
    read -r -a names <<< "$ALL_TEACHERS"
fi

if [ -n "$SHA_FILE" ] && [ ! -r "$SHA_FILE" ]; then
    echo "error: TEACHERS_SHA256=$SHA_FILE is not a readable file; unset it or point it at a sha256sum list"
    exit 2
fi

if command -v curl >/dev/null 2>&1; then
    FETCHER=curl
elif command -v wget >/dev/null 2>&1; then
    FETCHER=wget
else
    echo "error: neither curl nor wget is installed; install one of them"
    exit 1
fi

# The expected sha256 of teacher $1 from the optional list, or nothing.
expected_sha() {
    [ -n "$SHA_FILE" ] || return 0
    awk -v a="$1" -v b="$1_vanilla/ckpt_epoch_240.pth" \
        '{f=$2; sub(/^\*/, "", f)} f==a || f==b {print tolower($1); exit}' "$SHA_FILE"
}

# Check that file $2 is a checkpoint of teacher $1: its sha256 when one is listed, then
# {'model': state_dict} loading with strict=True into the repo's model of that name.
# Exit status 0 when it is; 3, with one line saying why, when it is not. Anything else
# means the check itself could not run (then nothing is judged invalid).
verify() {
    "$PY" - "$1" "$2" "$(expected_sha "$1")" "$REPO_ROOT" <<'PYEOF'
import hashlib
import os
import sys

name, path, sha, root = sys.argv[1:5]
sys.path.insert(0, root)

if sha:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    if digest.hexdigest() != sha:
        print('sha256 {} does not match the listed {}'.format(digest.hexdigest(), sha))
        sys.exit(3)

with open(path, 'rb') as f:
    head = f.read(4)
# torch.save writes a zip archive; torch < 1.6 wrote a bare pickle (protocol 2)
if not (head.startswith(b'PK') or head.startswith(b'\x80')):
    print('not a torch checkpoint (it starts with {!r}; an HTML error page?)'.format(head))
    sys.exit(3)

import torch
import models

# weights_only: these files come from the network, so by default never run pickled code from
# them; TEACHERS_TRUST_PICKLE=1 lifts that for a source you trust
trust = os.environ.get('TEACHERS_TRUST_PICKLE') == '1'
try:
    ckpt = torch.load(path, map_location='cpu', weights_only=not trust)
except Exception as err:
    hint = '' if trust else '; if you trust its source, TEACHERS_TRUST_PICKLE=1 loads it with weights_only=False'
    print('not a readable torch checkpoint (torch.load failed: {}){}'.format(type(err).__name__, hint))
    sys.exit(3)
if not isinstance(ckpt, dict) or 'model' not in ckpt:
    print("not a {'model': state_dict} checkpoint")
    sys.exit(3)
net = models.build_model(name, 100, dataset='cifar100')
state = ckpt['model']
if not isinstance(state, dict):
    print("ckpt['model'] is not a state_dict")
    sys.exit(3)
# say what does not fit in one line; load_state_dict's message spans many
want = net.state_dict()
missing = [k for k in want if k not in state]
unexpected = [k for k in state if k not in want]
wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
if missing or unexpected or wrong:
    example = (missing + unexpected + wrong)[0]
    print('weights do not fit {}: {} missing, {} unexpected, {} of a wrong shape (e.g. {})'.format(
        name, len(missing), len(unexpected), len(wrong), example))
    sys.exit(3)
try:
    net.load_state_dict(state, strict=True)
except Exception as err:
    print('weights do not load into {} ({})'.format(name, str(err).splitlines()[0][:200]))
    sys.exit(3)
PYEOF
}

# Download URL $1 into $2, resuming a partial file. Prints a one-line reason on failure.
download() {
    local url="$1" out="$2" rc err had_part=0
    [ -s "$out" ] && had_part=1
    if [ "$FETCHER" = curl ]; then
        err="$(curl -fL -sS --connect-timeout 20 --retry 2 -C - -o "$out" "$url" 2>&1)"
        rc=$?
        # 33/36: the server cannot resume (no byte ranges); 22 after a partial file: e.g.
        # 416 for a range past its end. Either way, start again from zero.
        if [ $rc -eq 33 ] || [ $rc -eq 36 ] || { [ $rc -eq 22 ] && [ $had_part -eq 1 ]; }; then
            rm -f "$out"
            err="$(curl -fL -sS --connect-timeout 20 --retry 2 -o "$out" "$url" 2>&1)"
            rc=$?
        fi
        case $rc in
            0) return 0 ;;
            5|6) echo "cannot resolve the host of $url (offline? no DNS?)" ;;
            7) echo "cannot connect to $url (offline, or the server is down)" ;;
            28) echo "timed out reaching $url (offline, or the server is down)" ;;
            22) echo "the server answered with an HTTP error for $url (moved or missing?): ${err##*: }" ;;
            *) echo "curl failed (exit status $rc) for $url: $err" ;;
        esac
    else
        err="$(wget -q -c --tries=3 --timeout=20 -O "$out" "$url" 2>&1)"
        rc=$?
        case $rc in
            0) return 0 ;;
            4) echo "network failure reaching $url (offline, or the server is down)" ;;
            8) echo "the server answered with an HTTP error for $url (moved or missing?)" ;;
            *) echo "wget failed (exit status $rc) for $url: $err" ;;
        esac
    fi
    return 1
}

# The check needs torch and the repo's models; find out now rather than misjudge a file.
if ! err="$("$PY" -c "import sys; sys.path.insert(0, sys.argv[1]); import torch, models" "$REPO_ROOT" 2>&1)"; then
    echo "error: '$PY' cannot import torch and the repo's models/, which the check of each file needs:"
    echo "       ${err##*$'\n'}"
    echo "       Activate the project's environment or set PYTHON=/path/to/python."
    exit 1
fi

# Runs verify on $1 $2; sets $why. Returns 0 valid, 1 invalid; exits on a broken check.
check() {
    why="$(verify "$1" "$2" 2>&1)"
    local rc=$?
    [ $rc -eq 0 ] && return 0
    [ $rc -eq 3 ] && return 1
    echo "error: the check of $2 crashed (exit status $rc):"
    echo "$why"
    exit 1
}

failed=()
for name in "${names[@]}"; do
    dir="save/models/${name}_vanilla"
    file="$dir/ckpt_epoch_240.pth"
    part="$file.part"
    url="$BASE_URL/${name}_vanilla/ckpt_epoch_240.pth"

    if [ -f "$file" ]; then
        if check "$name" "$file"; then
            echo "[skip] $file is present and valid"
            continue
        fi
        echo "[redo] $file is present but invalid: $why; moving it to $file.invalid"
        mv -f "$file" "$file.invalid"
    fi

    mkdir -p "$dir"
    # a complete earlier download that was never moved into place
    if [ -s "$part" ] && check "$name" "$part"; then
        mv -f "$part" "$file"
        echo "[ ok ] $file (from an earlier download)"
        continue
    fi

    echo "[get ] $url"
    if ! why="$(download "$url" "$part")"; then
        echo "[FAIL] $name: $why"
        echo "       Set TEACHERS_URL to a reachable mirror, or copy the file to $file by hand."
        # keep a partial download so the next run can resume it, but never an empty file
        [ -s "$part" ] || rm -f "$part"
        rmdir "$dir" 2>/dev/null
        failed+=("$name")
        continue
    fi
    if ! check "$name" "$part"; then
        echo "[FAIL] $name: the downloaded file is not a valid $name teacher: $why; deleted it"
        rm -f "$part"
        rmdir "$dir" 2>/dev/null
        failed+=("$name")
        continue
    fi
    mv -f "$part" "$file"
    echo "[ ok ] $file"
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "error: could not fetch: ${failed[*]}"
    exit 1
fi
echo "all requested teachers are in save/models/"
