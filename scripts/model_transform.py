"""Turn a torchvision ImageNet checkpoint into a teacher file this code base loads.

    python scripts/model_transform.py --model ResNet34 \\
        --src resnet34-333f7ec4.pth --dst save/models/ResNet34_vanilla/resnet34_transformed.pth

Our ImageNet models use torchvision's parameter names, so no renaming is needed (the reference
script only wraps the state_dict as ``{'model': state_dict}``). On top of that this script:

* accepts a raw state_dict, or a dict holding one under ``'state_dict'`` or ``'model'`` (the
  torchvision reference training scripts' format), and drops a ``module.`` prefix left by
  DataParallel / DistributedDataParallel;
* loads the result into ``--model`` with ``strict=True`` before writing, and writes what the model
  then holds, so BatchNorm counters missing from old files (``num_batches_tracked``, absent from
  e.g. ``resnet34-333f7ec4.pth``) are filled in;
* writes atomically (a temporary file in the destination folder, then ``os.replace``), so an
  interrupted run never leaves a half-written teacher.

Bad input (missing file, unknown model, keys or shapes that do not match) prints one line and
exits with status 2.
"""
import argparse
import os
import pickle
import sys
import tempfile

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from helper.errors import UserError  # noqa: E402
from models import build_model  # noqa: E402

# how many mismatched keys an error message names
_SHOWN = 5


def _few(keys):
    keys = sorted(keys)
    text = ', '.join(keys[:_SHOWN])
    if len(keys) > _SHOWN:
        text += ', ... ({} in all)'.format(len(keys))
    return text


def read_checkpoint(src, allow_pickle=False):
    """Load ``src`` on the CPU; only tensors and plain containers unless ``allow_pickle``."""
    if not os.path.isfile(src):
        raise UserError("--src file not found: '{}'; download the torchvision checkpoint "
                        "(e.g. https://download.pytorch.org/models/resnet34-333f7ec4.pth) and pass its path"
                        .format(src))
    try:
        return torch.load(src, map_location='cpu', weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        if allow_pickle:
            raise UserError("cannot read '{}' as a PyTorch checkpoint: {}".format(src, _first_line(err)))
        raise UserError("cannot read '{}' as tensors only (it holds other Python objects, or is not a "
                        "PyTorch file); if you trust it, run again with --allow-pickle".format(src))
    except Exception as err:  # a damaged or foreign file fails in many ways inside the unpickler
        raise UserError("cannot read '{}' as a PyTorch checkpoint: {}".format(src, _first_line(err)))


def _first_line(err):
    text = str(err).strip()
    return '{}: {}'.format(type(err).__name__, text.splitlines()[0]) if text else type(err).__name__


def extract_state_dict(ckpt):
    """The parameter dict inside a checkpoint, as a plain dict with any ``module.`` prefix removed."""
    if isinstance(ckpt, dict):
        for key in ('state_dict', 'model'):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt:
        raise UserError('the checkpoint holds no state_dict (expected a dict of tensors, '
                        "or one under 'state_dict' or 'model')")
    not_tensors = [k for k, v in ckpt.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise UserError('the checkpoint is not a state_dict: these entries are not tensors: {}'
                        .format(_few(map(str, not_tensors))))
    # A fresh plain dict also drops torch's per-module version metadata, which lets BatchNorm
    # accept files saved before it had num_batches_tracked.
    if all(k.startswith('module.') for k in ckpt):
        return {k[len('module.'):]: v for k, v in ckpt.items()}
    return dict(ckpt)


def convert(state_dict, model_name, num_classes=1000):
    """Load ``state_dict`` into a fresh ``model_name`` with ``strict=True`` and return the model."""
    try:
        model = build_model(model_name, num_classes, dataset='imagenet')
    except KeyError as err:
        raise UserError('unknown --model: {}'.format(err.args[0]))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = ['{} {} vs {}'.format(k, tuple(v.shape), tuple(expected[k].shape))
                   for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    problems = []
    if missing:
        problems.append('missing in the checkpoint: ' + _few(missing))
    if unexpected:
        problems.append('not in {}: {}'.format(model_name, _few(unexpected)))
    if wrong_shape:
        problems.append('shape (checkpoint vs model): ' + _few(wrong_shape))
    if problems:
        raise UserError('the checkpoint does not fit --model {} (num_classes={}): {}; check --model '
                        'and --num_classes'.format(model_name, num_classes, '; '.join(problems)))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise UserError('loading into {} failed: {}'.format(model_name, ' '.join(str(err).split())))
    return model


def transform(model_name, src, dst, num_classes=1000, allow_pickle=False):
    """Convert ``src`` for ``model_name`` and write ``{'model': state_dict}`` to ``dst`` atomically."""
    model = convert(extract_state_dict(read_checkpoint(src, allow_pickle)), model_name, num_classes)
    state = model.state_dict()
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(dst) + '.', suffix='.tmp')
    os.close(fd)
    try:
        torch.save({'model': state}, tmp)
        # what the training script will do with the file: read it back and load it strictly
        written = torch.load(tmp, map_location='cpu', weights_only=True)
        model.load_state_dict(written['model'], strict=True)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True, help='registry name, e.g. ResNet34, vgg13_imagenet')
    parser.add_argument('--src', required=True, help='torchvision checkpoint (.pth)')
    parser.add_argument('--dst', required=True, help='output file, e.g. save/models/ResNet34_vanilla/resnet34_transformed.pth')
    parser.add_argument('--num_classes', type=int, default=1000)
    parser.add_argument('--allow-pickle', action='store_true',
                        help='read files that hold Python objects besides tensors (only for files you trust)')
    args = parser.parse_args(argv)
    try:
        state = transform(args.model, args.src, args.dst, args.num_classes, args.allow_pickle)
    except UserError as err:
        print('error: {}'.format(err), file=sys.stderr)
        return 2
    print("wrote '{}': {} tensors for {}, loads with strict=True".format(args.dst, len(state), args.model))
    return 0


if __name__ == '__main__':
    sys.exit(main())
