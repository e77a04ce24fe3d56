"""Finding and loading the teacher of a distillation run."""
import os
import re

from helper.errors import UserError
from helper.trainer import load_checkpoint, load_state_strict

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
