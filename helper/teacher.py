"""Finding, loading and evaluating the teacher of a distillation run."""
import datetime
import hashlib
import json
import os
import re

import torch

from helper.errors import UserError
from helper.trainer import is_main, load_checkpoint, load_state_strict
from helper.util import save_dict_to_json

# under --save_root: the teacher accuracies measured so far, one per (checkpoint file, test set)
ACCURACY_FILE = 'teacher_accuracy.json'

SPLIT = '~' if os.name == 'nt' else ':'


def get_teacher_name(path, names):
    """The architecture named by the checkpoint's folder, as in the reference.

    ``.../resnet32x4_vanilla/ckpt_epoch_240.pth`` -> resnet32x4 (the longest registered
    name the folder starts with, so ``wrn_40_2`` and ``resnet8x4_double`` parse whole);
    a student run folder ``S:{model}_T:...`` -> that student model.
    """
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    match = re.match(r'S[:~](.+?)_T[:~]', folder)
    if match and match.group(1) in names:
        return match.group(1)
    candidates = [n for n in names if folder == n or folder.startswith(n + '_')]
    if not candidates:
        raise UserError("cannot tell the teacher's architecture from its folder name '{}'; pass --model_t NAME"
                        .format(folder))
    return max(candidates, key=len)


def load_teacher(path, name, num_classes, dataset):
    """Build ``name`` and load the checkpoint's ``'model'`` weights with strict=True."""
    from models import build_model
    ckpt = load_checkpoint(path, 'teacher file')
    state = ckpt.get('model') if isinstance(ckpt, dict) else None
    if state is None and isinstance(ckpt, dict) and ckpt and all(hasattr(v, 'shape') for v in ckpt.values()):
        state = ckpt  # a bare state_dict
    if not isinstance(state, dict):
        raise UserError("teacher file '{}' holds no 'model' state_dict; expected a {{'model': state_dict}} "
                        "checkpoint".format(path))
    model = build_model(name, num_classes, dataset=dataset)
    load_state_strict(model, state, path, 'teacher file')
    return model


def teacher_accuracy(opt, measure, test_set_id, device, log=print):
    """Log the teacher's test accuracy before training, as the reference does.

    The teacher never changes, so ``measure()`` (-> top-1, top-5, loss) runs once per checkpoint file
    (path, size, modification time) and test set (``test_set_id``: a digest of its images, labels and
    transform; None: measure every time); the result is kept in ``<save_root>/teacher_accuracy.json``
    and later runs read it. ``--revalidate_teacher`` measures again. On a GPU the measurement takes
    seconds, on a CPU minutes: as long as a sixth of a CIFAR-100 training epoch.
    """
    path = os.path.join(opt.save_root, ACCURACY_FILE)
    key = _accuracy_key(opt, test_set_id)
    known = None
    if key is not None and not opt.revalidate_teacher and is_main(opt):
        known = _read_entries(path).get(key)
    # every process takes rank 0's branch: a measurement reduces across them
    known = _from_rank0(known, device)
    if known is not None:
        log('teacher accuracy: {:.2f} (acc@5 {:.2f}), as an earlier run measured it on this checkpoint and '
            'test set ({}; --revalidate_teacher measures it again)'.format(known[0], known[1], path))
        return
    acc, acc5, _ = measure()
    log('teacher accuracy: {:.2f} (acc@5 {:.2f})'.format(acc, acc5))
    if key is not None and is_main(opt):
        entries = _read_entries(path)
        entries[key] = {'acc': acc, 'acc_top5': acc5, 'path_t': os.path.realpath(opt.path_t),
                        'model_t': opt.model_t, 'dataset': opt.dataset,
                        'measured': datetime.datetime.now().isoformat(timespec='seconds')}
        try:
            save_dict_to_json(entries, path)
        except OSError:
            pass  # only a saving: the next run measures again


def _accuracy_key(opt, test_set_id):
    if test_set_id is None:
        return None
    st = os.stat(opt.path_t)
    # the precision the teacher runs in can move an accuracy by a few images
    what = [os.path.realpath(opt.path_t), st.st_size, st.st_mtime_ns, opt.model_t, opt.dataset,
            getattr(opt, 'amp', None), test_set_id]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]


def _read_entries(path):
    try:
        with open(path) as f:
            entries = json.load(f)
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}


def _from_rank0(known, device):
    """``known`` ((top-1, top-5) or None) as rank 0 has it, on every process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None if known is None else (known['acc'], known['acc_top5'])
    value = torch.zeros(3, dtype=torch.float64, device=device)
    if known is not None:
        value[:] = torch.tensor([1.0, known['acc'], known['acc_top5']], dtype=torch.float64)
    dist.broadcast(value, src=0)
    found, acc, acc5 = value.tolist()
    return (acc, acc5) if found else None
