#!/usr/bin/env python
"""Evaluate any checkpoint on a validation set: top-1, top-5, loss, parameters, FLOPs per image and
images/s of inference.

    python scripts/eval.py --path save/student_model/S:resnet8x4_T:resnet32x4_cifar100_semckd_r:1.0_a:1.0_b:400.0_0/resnet8x4_best.pth
    python scripts/eval.py --path save/models/resnet32x4_vanilla/ckpt_epoch_240.pth
    python scripts/eval.py --path save/models/ResNet34_vanilla/resnet34_transformed.pth --dataset imagenet
    python scripts/eval.py --path RUN/resnet8_best.pth --per_class per_class.csv --json

Reads teachers, students and torchvision-converted checkpoints ({'model': state_dict}, or a bare
state_dict). The architecture comes from --model, else the checkpoint ('arch'), else the run folder's
name (``{model}_...`` or ``S:{model}_T:...``); the data set from --dataset, else the checkpoint, else
the run folder's parameters.json, else cifar100. When the run's method changes how the student
predicts (its class sets ``changes_prediction``), the checkpoint's method modules are rebuilt from
the registry and the run's flags, and the predictions are the method's ``predict``.

FLOPs per image are counted by torch.utils.flop_counter.FlopCounterMode on one image (a
multiply-add counts as 2 FLOPs); images/s times the forward passes only (no data loading), after
one warm-up batch.
"""
import argparse
import csv
import inspect
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from helper.errors import UserError  # noqa: E402


# ------------------------------------------------------------------------------------ run folders
def run_parameters(path):
    """The flags of the run a checkpoint belongs to (its folder's parameters.json), or {}."""
    params = os.path.join(os.path.dirname(os.path.abspath(path)), 'parameters.json')
    if not os.path.isfile(params):
        return {}
    try:
        with open(params) as f:
            return json.load(f)
    except ValueError:
        return {}


def read_checkpoint(path):
    """-> (checkpoint dict, state_dict of the network)."""
    from helper.trainer import load_checkpoint
    ckpt = load_checkpoint(path, 'checkpoint')
    if isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict):
        return ckpt, ckpt['model']
    if isinstance(ckpt, dict) and ckpt and all(hasattr(v, 'shape') for v in ckpt.values()):
        return {}, ckpt  # a bare state_dict
    raise UserError("'{}' holds no 'model' state_dict; expected a checkpoint of train_teacher.py, train_student.py "
                    "or scripts/model_transform.py".format(path))


def resolve_model(path, ckpt, name=None):
    """The architecture: ``name``, else the checkpoint's 'arch', else the run folder's name."""
    from models import model_dict
    from helper.teacher import get_teacher_name
    name = name or ckpt.get('arch')
    if name is None:
        try:
            name = get_teacher_name(path, model_dict)
        except UserError:
            raise UserError("cannot tell the architecture of '{}' from the checkpoint or its folder name; pass "
                            "--model NAME".format(path)) from None
    if name not in model_dict:
        raise UserError("unknown model '{}'; valid names: {}".format(name, ', '.join(sorted(model_dict))))
    return name


def resolve_dataset(ckpt, params, dataset=None):
    from dataset import NUM_CLASSES
    dataset = dataset or ckpt.get('dataset') or params.get('dataset') or 'cifar100'
    if dataset not in NUM_CLASSES:
        raise UserError("unknown --dataset '{}'; choose one of {}".format(dataset, ', '.join(NUM_CLASSES)))
    return dataset


def load_network(path, name=None, dataset=None):
    """-> (model in eval mode, checkpoint, architecture, data set, run flags) of any checkpoint."""
    from dataset import NUM_CLASSES
    from helper.trainer import load_state_strict
    from models import build_model
    ckpt, state = read_checkpoint(path)
    params = run_parameters(path)
    name = resolve_model(path, ckpt, name)
    dataset = resolve_dataset(ckpt, params, dataset)
    model = build_model(name, NUM_CLASSES[dataset], dataset=dataset)
    try:
        load_state_strict(model, state, path, 'checkpoint')
    except UserError as err:
        raise UserError('{} (built {} for {}; pass --model / --dataset if that is not what it holds)'.format(
            err, name, dataset)) from None
    return model.eval(), ckpt, name, dataset, params


# ------------------------------------------------------------------------------------ prediction
class Predictor(nn.Module):
    """What a run predicts with: the network's own logits, or its method's ``predict(feat_s, logit_s)``.

    Called like a model of the zoo: ``predictor(x)`` gives the logits, ``predictor(x, is_feat=True)``
    the network's feature list and those logits.
    """

    def __init__(self, model, distiller=None):
        super().__init__()
        self.model = model
        self.distiller = distiller

    def forward(self, x, is_feat=False):
        if self.distiller is None:
            return self.model(x, is_feat=is_feat)
        feat, logit = self.model(x, is_feat=True, preact=getattr(self.distiller, 'preact', False))
        logit = self.distiller.predict(feat, logit)
        return (feat, logit) if is_feat else logit


def run_flags(ckpt, params):
    """The run's flags: 'opt' in the checkpoint, else the run folder's parameters.json."""
    return ckpt.get('opt') or params


def rebuild_distiller(model_s, model_t, ckpt, flags, path, dataset):
    """The run's method modules with the checkpoint's 'distiller' weights, built as train_student.py
    builds them: from the registry, the run's flags and one probe forward of both networks."""
    from dataset import image_size
    from distiller_zoo import DISTILLERS
    from helper.trainer import load_state_strict

    cls = DISTILLERS.get(ckpt.get('distill'))
    if cls is None or not flags or 'distiller' not in ckpt:
        raise UserError("cannot rebuild the --distill {} modules of '{}': it needs a student checkpoint with "
                        "'distill' and 'distiller', and the run's flags ('opt' or the run folder's "
                        "parameters.json)".format(ckpt.get('distill'), path))
    opt = argparse.Namespace(**flags)
    size = image_size(dataset)
    probe = torch.randn(2, 3, size, size, device=next(model_s.parameters()).device)
    preact = getattr(cls, 'preact', False)
    was_training = model_s.training, model_t.training
    model_s.eval()
    model_t.eval()
    with torch.no_grad():
        feat_s, _ = model_s(probe, is_feat=True, preact=preact)
        feat_t, _ = model_t(probe, is_feat=True, preact=preact)
    model_s.train(was_training[0])
    model_t.train(was_training[1])
    kwargs = {}
    if 'model_t' in inspect.signature(cls.__init__).parameters:  # the widened interface
        kwargs = {'model_s': model_s, 'model_t': model_t}
    distiller = cls(feat_s, feat_t, opt, **kwargs)
    load_state_strict(distiller, ckpt['distiller'], path, 'checkpoint')
    return distiller.eval()


def build_predictor(model, ckpt, dataset, params, path):
    """``Predictor(model)``, or with the method's modules when the run's method changes the prediction.

    Only the teacher's architecture is built, for the probe: everything ``predict`` uses is in the
    checkpoint's 'distiller' state.
    """
    from dataset import NUM_CLASSES
    from distiller_zoo import DISTILLERS
    from models import build_model

    cls = DISTILLERS.get(ckpt.get('distill'))
    if cls is None or not getattr(cls, 'changes_prediction', False):
        return Predictor(model)
    flags = run_flags(ckpt, params)
    teacher = ckpt.get('teacher') or (flags or {}).get('model_t')
    if teacher is None:
        raise UserError("'{}' was trained with --distill {}, which predicts through its own modules, but neither "
                        "the checkpoint nor its run folder names the teacher".format(path, ckpt.get('distill')))
    model_t = build_model(teacher, NUM_CLASSES[dataset], dataset=dataset)
    return Predictor(model, rebuild_distiller(model, model_t, ckpt, flags, path, dataset))


# ------------------------------------------------------------------------------------ data
def val_dataset(dataset, data_folder, params=None, synthetic_val_size=None):
    """The validation split of ``dataset`` with its test transform."""
    params = params or {}
    if dataset == 'cifar100':
        from dataset.cifar100 import CIFAR100, test_transform
        return CIFAR100(data_folder, train=False, transform=test_transform(), download=True)
    if dataset == 'synthetic':
        from dataset import synthetic
        size = synthetic_val_size or params.get('synthetic_val_size') or synthetic.VAL_SIZE
        seed = params.get('synthetic_seed')
        return synthetic.SyntheticImages(size, train=False, seed=synthetic.SEED if seed is None else seed)
    from torchvision import datasets
    from dataset.imagenet import _open_folder, find_root, test_transform
    root = find_root(data_folder, dataset)
    return _open_folder(datasets.ImageFolder, os.path.join(root, 'val'), transform=test_transform())


def class_names(data):
    names = getattr(data, 'classes', None)
    return list(names) if names else None


# ------------------------------------------------------------------------------------ measuring
def count_flops(predictor, dataset, device):
    """FLOPs of one image's forward pass (FlopCounterMode: a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode
    from dataset import image_size
    size = image_size(dataset)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        predictor(torch.zeros(1, 3, size, size, device=device))
    return int(counter.get_total_flops())


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def evaluate(predictor, loader, num_classes, device):
    """Top-1/top-5 %, mean cross-entropy, per-class hits and forward-only images/s over ``loader``."""
    n = torch.zeros(num_classes, dtype=torch.long)
    hit1 = torch.zeros(num_classes, dtype=torch.long)
    hit5 = torch.zeros(num_classes, dtype=torch.long)
    loss_sum, seconds, timed = 0.0, 0.0, 0
    warm = False
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), torch.as_tensor(y).to(device)
            if not warm:  # the first call pays for allocations and kernel selection
                predictor(x)
                warm = True
            _sync(device)
            start = time.perf_counter()
            logits = predictor(x)
            _sync(device)
            seconds += time.perf_counter() - start
            timed += x.shape[0]
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction='sum'))
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct5 = (top5 == y[:, None]).any(dim=1).cpu()
            correct1 = (top5[:, 0] == y).cpu()
            y = y.cpu()
            n += torch.bincount(y, minlength=num_classes)
            hit1 += torch.bincount(y[correct1], minlength=num_classes)
            hit5 += torch.bincount(y[correct5], minlength=num_classes)
    total = int(n.sum())
    if total == 0:
        raise UserError('the validation set is empty')
    return {'images': total, 'top1': 100.0 * float(hit1.sum()) / total, 'top5': 100.0 * float(hit5.sum()) / total,
            'loss': loss_sum / total, 'images_per_s': timed / max(seconds, 1e-9),
            'per_class': {'images': n.tolist(), 'top1_hits': hit1.tolist(), 'top5_hits': hit5.tolist()}}


def write_per_class(path, per_class, names):
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['class', 'name', 'images', 'top1', 'top5'])
        for c, (n, h1, h5) in enumerate(zip(per_class['images'], per_class['top1_hits'], per_class['top5_hits'])):
            if n == 0:
                continue
            name = names[c] if names and c < len(names) else str(c)
            writer.writerow([c, name, n, '{:.4f}'.format(100.0 * h1 / n), '{:.4f}'.format(100.0 * h5 / n)])


# ------------------------------------------------------------------------------------ main
def parse_option(argv=None):
    from dataset import NUM_CLASSES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--path', required=True, help='the checkpoint (.pth)')
    parser.add_argument('--model', default=None, help='architecture (default: from the checkpoint or its folder)')
    parser.add_argument('--dataset', default=None, choices=list(NUM_CLASSES),
                        help='default: from the checkpoint or its run folder, else cifar100')
    parser.add_argument('--data_folder', default='./data', help='where the data set lives')
    parser.add_argument('--batch_size', type=int, default=256)
    parser.add_argument('--num_workers', type=int, default=2)
    parser.add_argument('--cpu', action='store_true', help='evaluate on the CPU even when a GPU is there')
    parser.add_argument('--per_class', default=None, metavar='CSV', help='write per-class accuracy to this CSV')
    parser.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    parser.add_argument('--synthetic_val_size', type=int, default=None, help=argparse.SUPPRESS)
    opt = parser.parse_args(argv)
    if opt.batch_size <= 0:
        raise UserError('--batch_size must be positive (got {})'.format(opt.batch_size))
    return opt


def run(opt):
    """Evaluate ``opt.path``; returns the result dict (what --json prints)."""
    from torch.utils.data import DataLoader
    from dataset import NUM_CLASSES

    device = torch.device('cuda' if torch.cuda.is_available() and not opt.cpu else 'cpu')
    model, ckpt, name, dataset, params = load_network(opt.path, opt.model, opt.dataset)
    predictor = build_predictor(model, ckpt, dataset, params, opt.path).to(device).eval()
    data = val_dataset(dataset, opt.data_folder, run_flags(ckpt, params), opt.synthetic_val_size)
    workers = max(0, min(opt.num_workers, os.cpu_count() or 1))
    loader = DataLoader(data, batch_size=opt.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == 'cuda')
    result = evaluate(predictor, loader, NUM_CLASSES[dataset], device)
    per_class = result.pop('per_class')
    if opt.per_class:
        write_per_class(opt.per_class, per_class, class_names(data))
    distiller = predictor.distiller
    result.update({
        'path': opt.path, 'model': name, 'dataset': dataset, 'epoch': ckpt.get('epoch'),
        'distill': ckpt.get('distill'),
        'prediction': 'method' if distiller is not None else 'model',
        'params': sum(p.numel() for p in model.parameters()),
        'params_method': sum(p.numel() for p in distiller.parameters()) if distiller is not None else 0,
        'flops_per_image': count_flops(predictor, dataset, device),
        'device': str(device), 'batch_size': opt.batch_size,
    })
    if opt.per_class:
        result['per_class_csv'] = opt.per_class
    return result


def report(r):
    how = ("its method's predict() (--distill {})".format(r['distill']) if r['prediction'] == 'method'
           else "the network's classifier")
    lines = [
        'checkpoint    {}{}'.format(r['path'], ' (epoch {})'.format(r['epoch']) if r['epoch'] is not None else ''),
        'model         {} on {} ({} validation images), predictions from {}'.format(r['model'], r['dataset'],
                                                                                    r['images'], how),
        'top-1         {:.2f} %'.format(r['top1']),
        'top-5         {:.2f} %'.format(r['top5']),
        'loss          {:.4f}'.format(r['loss']),
        'parameters    {:.3f} M{}'.format(r['params'] / 1e6, ' (+ {:.3f} M in the method\'s modules)'.format(
            r['params_method'] / 1e6) if r['params_method'] else ''),
        'FLOPs/image   {:.2f} M ({:.2f} M multiply-adds)'.format(r['flops_per_image'] / 1e6,
                                                               r['flops_per_image'] / 2e6),
        'images/s      {:.0f} (forward only, {}, batch {})'.format(r['images_per_s'], r['device'], r['batch_size']),
    ]
    if r.get('per_class_csv'):
        lines.append('per class     {}'.format(r['per_class_csv']))
    return '\n'.join(lines)


def main(argv=None):
    opt = parse_option(argv)
    result = run(opt)
    print(json.dumps(result, indent=1) if opt.json else report(result))
    return result


if __name__ == '__main__':
    from helper.trainer import run_main
    run_main(main)
