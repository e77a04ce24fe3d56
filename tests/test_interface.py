"""The method interface: the loop uses every hook of a ``Distiller`` without asking which method runs.

A toy method, registered for these tests only, uses every hook at once; it runs in-process through
``train_student.main`` on a tiny synthetic set, and records what it saw. Also here: the method facts in
one place (README table, sweep) and the data-set wrapper against the former per-data-set code.
"""
import json
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distiller_zoo import DISTILLERS, Distiller, InitStage, method_table, register, unregister
from models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_VAL, BATCH = 48, 32, 16
STEPS = N_TRAIN // BATCH


class Toy(Distiller):
    """Every hook: its own flag, instance batches with one extra view, pre-activation features,
    its own logit loss instead of KL, two named terms, an epoch hook, an init stage over ``head``,
    and a test-time predictor that always ranks class 0 first, then 1, 2, ..."""
    display_name = 'Toy'
    source = 'tests/test_interface.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 0.5}
    data_mode = 'instance'
    extra_views = 1
    preact = True
    replaces_kd = True
    changes_prediction = True
    seen = None  # what the last run showed the method, reset per run

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument('--toy_fail_at', type=int, default=0, help='raise at this init step (tests resume)')

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        self.head = nn.Linear(feat_s[-1].shape[1], feat_t[-1].shape[1])
        self.other = nn.Parameter(torch.zeros(3))  # not part of the init stage
        self.opt = opt
        self.models = [model_s, model_t]  # a plain list: not submodules, not in the checkpoint
        Toy.seen = {'epochs': [], 'init_steps': 0, 'preact_negative': [], 'views_ok': [], 'index_ok': [],
                    'predicted': 0, 'at_main_start': None,
                    'initial': {'student': _copy(model_s.state_dict()), 'teacher': _copy(model_t.state_dict()),
                                'distiller': _copy(self.state_dict())}}

    def on_epoch_start(self, epoch):
        Toy.seen['epochs'].append(epoch)
        if Toy.seen['at_main_start'] is None:
            last = os.path.join(self.opt.save_folder, '{}_last.pth'.format(self.opt.model_s))
            Toy.seen['at_main_start'] = {
                'student': _copy(self.models[0].state_dict()), 'teacher': _copy(self.models[1].state_dict()),
                'distiller': _copy(self.state_dict()),
                'checkpoint': torch.load(last, map_location='cpu', weights_only=False) if os.path.isfile(last) else None}

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        Toy.seen['preact_negative'].append(bool((feat_s[1] < 0).any()))
        views = batch.get('views')
        Toy.seen['views_ok'].append(views is not None and len(views) == 1
                                    and tuple(views[0].shape) == (len(batch['target']), 3, 32, 32))
        Toy.seen['index_ok'].append('index' in batch and batch['index'].shape == batch['target'].shape)
        self.train_prediction = self._ranked(logit_s)  # the training accuracy's logits, from this pass
        return {'logit': F.mse_loss(logit_s, logit_t), 'feat': (self.head(feat_s[-1]) - feat_t[-1]).pow(2).mean()
                + self.other.sum()}

    def predict(self, feat_s, logit_s):
        Toy.seen['predicted'] += logit_s.shape[0]
        return self._ranked(logit_s)

    @staticmethod
    def _ranked(logit_s):
        return -torch.arange(logit_s.shape[1], dtype=logit_s.dtype, device=logit_s.device).expand_as(logit_s)

    def init_stage(self, opt):
        return InitStage(opt.init_epochs, [self.head], lr=0.02)

    def init_loss(self, feat_s, feat_t, logit_s, logit_t, batch):
        Toy.seen['init_steps'] += 1
        if Toy.seen['init_steps'] == self.opt.toy_fail_at:
            raise RuntimeError('toy: interrupted')
        return (self.head(feat_s[-1]) - feat_t[-1]).pow(2).mean()


def _copy(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope='module')
def toy():
    register('toy')(Toy)
    yield Toy
    unregister('toy')
    torch.use_deterministic_algorithms(False)  # --deterministic set it for this process


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp('t') / 'resnet8_vanilla'
    folder.mkdir()
    torch.manual_seed(0)
    torch.save({'model': build_model('resnet8', 100, dataset='synthetic').state_dict()}, folder / 'ckpt.pth')
    return str(folder / 'ckpt.pth')


def run(teacher, root, *extra, epochs=2, init_epochs=2):
    import train_student
    args = ['--path-t', teacher, '--distill', 'toy', '--model_s', 'resnet8', '-b', '0.5', '--dataset', 'synthetic',
            '--synthetic_train_size', str(N_TRAIN), '--synthetic_val_size', str(N_VAL), '--batch_size', str(BATCH),
            '--num_workers', '0', '--epochs', str(epochs), '--init_epochs', str(init_epochs), '--save_root',
            str(root), '--print-freq', '1', '--skip-validation', '--seed', '5', '--deterministic', '--save_freq', '1']
    train_student.main(args + [str(a) for a in extra])
    return root / 'student_model' / 'S:resnet8_T:resnet8_synthetic_toy_r:1.0_a:1.0_b:0.5_0'


@pytest.fixture(scope='module')
def full_run(toy, teacher, tmp_path_factory):
    """Two init epochs, two main epochs, uninterrupted: (run folder, what the method saw, stdout)."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        folder = run(teacher, tmp_path_factory.mktemp('full'))
    return folder, Toy.seen, out.getvalue()


# ---------------------------------------------------------------------------- no per-method branch

def test_loop_never_asks_which_method_runs():
    names = set(DISTILLERS) | {cls.display_name for cls in DISTILLERS.values()}
    files = [os.path.join(REPO, 'helper', f) for f in os.listdir(os.path.join(REPO, 'helper')) if f.endswith('.py')]
    for path in files + [os.path.join(REPO, 'train_student.py')]:
        with open(path) as f:
            text = f.read()
        # the one exception: the --distill flag's default
        text = text.replace("'--distill', type=str, default='kd'", '')
        for name in names:
            assert not re.search(r'''['"]{}['"]'''.format(re.escape(name)), text), (path, name)
        assert not re.search(r'distill\s*(==|!=|in\b)', text), path


# ---------------------------------------------------------------------------- one step, by hand

def test_replaces_kd_drops_the_kl_term_and_preact_features_reach_the_method(toy):
    from argparse import Namespace
    from helper.loops import DistillObjective
    torch.manual_seed(0)
    model_s = build_model('resnet8', 10, dataset='synthetic')
    model_t = build_model('resnet8x4', 10, dataset='synthetic').eval()
    x = torch.randn(BATCH, 3, 32, 32)
    with torch.no_grad():
        feat_s, _ = model_s(x[:2], is_feat=True, preact=True)
        feat_t, _ = model_t(x[:2], is_feat=True, preact=True)
    opt = Namespace(kd_T=4.0, gamma=0.7, alpha=3.0, beta=0.5, toy_fail_at=0, save_folder='', model_s='resnet8')
    distiller = Toy(feat_s, feat_t, opt, model_s, model_t)
    batch = {'target': torch.randint(10, (BATCH,)), 'index': torch.arange(BATCH), 'views': [x.flip(-1)]}
    loss, logits, terms = DistillObjective(model_s, model_t, distiller, opt)(x, batch)

    f_s, l_s = model_s(x, is_feat=True, preact=True)
    f_t, l_t = model_t(x, is_feat=True, preact=True)
    logit = ((l_s - l_t) ** 2).mean()
    feat = ((f_s[-1] @ distiller.head.weight.t() + distiller.head.bias - f_t[-1]) ** 2).mean()
    by_hand = 0.7 * F.cross_entropy(l_s, batch['target']) + 0.5 * (logit + feat)  # and no 3.0 * KL
    assert torch.allclose(loss, by_hand, rtol=1e-5)
    assert list(terms) == ['cls', 'logit', 'feat']
    assert Toy.seen['preact_negative'] == [True]  # post-ReLU maps are never negative

    # the same method with the KL term kept adds alpha * KL
    class ToyKD(Toy):
        replaces_kd = False
    loss_kd, _, terms_kd = DistillObjective(model_s, model_t, ToyKD(feat_s, feat_t, opt, model_s, model_t), opt)(x, batch)
    log_p_s, p_t = F.log_softmax(l_s / 4, 1), F.softmax(l_t / 4, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean() * 16
    assert torch.allclose(terms_kd['div'], kl, rtol=1e-4)
    method_kd = terms_kd['logit'] + terms_kd['feat']
    assert torch.allclose(loss_kd, 0.7 * F.cross_entropy(l_s, batch['target']) + 3.0 * kl + 0.5 * method_kd, rtol=1e-5)


# ---------------------------------------------------------------------------- every hook, end to end

def test_flags_terms_epoch_hook_views_and_checkpoints(full_run):
    folder, seen, stdout = full_run
    metrics = [json.loads(line) for line in open(folder / 'metrics.jsonl')]
    assert [m['epoch'] for m in metrics] == [1, 2]
    for m in metrics:
        assert {'loss_cls', 'loss_logit', 'loss_feat'} <= set(m) and 'loss_div' not in m
        assert m['train_loss'] == pytest.approx(m['loss_cls'] + 0.5 * (m['loss_logit'] + m['loss_feat']), rel=1e-5)
    assert '(cls ' in stdout and 'logit ' in stdout and 'feat ' in stdout
    assert seen['epochs'] == [1, 2]
    assert all(seen['preact_negative']) and all(seen['views_ok']) and all(seen['index_ok'])
    assert len(seen['views_ok']) == 2 * STEPS
    for name in ('resnet8_best.pth', 'resnet8_last.pth', 'ckpt_epoch_2.pth'):
        ckpt = torch.load(folder / name, map_location='cpu', weights_only=False)
        assert ckpt['opt']['distill'] == 'toy' and ckpt['opt']['toy_fail_at'] == 0 and ckpt['opt']['init_epochs'] == 2
        json.dumps(ckpt['opt'])


def test_extra_views_are_other_draws_of_the_augmentation(toy):
    from types import SimpleNamespace
    from dataset import get_dataloaders
    opt = SimpleNamespace(dataset='synthetic', synthetic_train_size=N_TRAIN, synthetic_val_size=N_VAL,
                          batch_size=BATCH, num_workers=0, seed=1)
    loader = get_dataloaders(opt, 'instance', extra_views=2)[0]
    batch = next(iter(loader))
    assert set(batch) == {'input', 'target', 'index', 'views'} and len(batch['views']) == 2
    base = loader.dataset.base
    for b in range(3):
        plain = base.image(int(batch['index'][b]))
        for img in [batch['input'][b]] + [v[b] for v in batch['views']]:
            assert img.shape == plain.shape
    assert not torch.equal(batch['views'][0], batch['input']) and not torch.equal(batch['views'][0], batch['views'][1])


def test_validation_and_best_checkpoint_use_predict(full_run):
    folder, seen, _ = full_run
    from dataset.synthetic import SyntheticImages
    targets = SyntheticImages(N_VAL, train=False).targets
    # predict() ranks classes 0, 1, 2, ...: its accuracies follow from the labels alone
    top1, top5 = 100.0 * sum(t == 0 for t in targets) / N_VAL, 100.0 * sum(t < 5 for t in targets) / N_VAL
    metrics = [json.loads(line) for line in open(folder / 'metrics.jsonl')]
    assert all(m['test_acc'] == pytest.approx(top1) and m['test_acc_top5'] == pytest.approx(top5) for m in metrics)
    assert seen['predicted'] == 2 * N_VAL
    best = json.load(open(folder / 'test_best_metrics.json'))
    assert best['test_acc'] == pytest.approx(top1)


def test_init_stage_trains_only_its_modules_and_the_main_stage_starts_from_it(full_run):
    folder, seen, stdout = full_run
    assert seen['init_steps'] == 2 * STEPS
    assert 'init epoch 1/2' in stdout and 'init epoch 2/2' in stdout
    start, initial = seen['at_main_start'], seen['initial']
    assert _equal(start['student'], initial['student'])  # BN statistics included: the student stayed in eval mode
    assert _equal(start['teacher'], initial['teacher'])
    for k, v in start['distiller'].items():
        assert torch.equal(v, initial['distiller'][k]) != k.startswith('head.'), k
    ckpt = start['checkpoint']  # what the init stage left in *_last.pth, read as the main stage begins
    assert ckpt['epoch'] == 0 and ckpt['init_epoch'] == 2
    assert _equal(ckpt['distiller'], start['distiller']) and _equal(ckpt['model'], start['student'])


def test_interrupted_init_stage_resumes_and_a_finished_one_is_skipped(full_run, teacher, tmp_path):
    import contextlib
    import io
    folder, _, _ = full_run
    with pytest.raises(RuntimeError, match='toy: interrupted'):
        run(teacher, tmp_path, '--toy_fail_at', STEPS + 2)  # in the second init epoch
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        resumed = run(teacher, tmp_path, '--resume', 'auto')
    assert '==> init epoch 2/2' in out.getvalue() and '==> init epoch 1/2' not in out.getvalue()
    assert '(init epoch 1/2)' in out.getvalue()  # the resume line
    assert Toy.seen['init_steps'] == STEPS and Toy.seen['epochs'] == [1, 2]
    a = torch.load(folder / 'resnet8_last.pth', map_location='cpu', weights_only=False)
    b = torch.load(resumed / 'resnet8_last.pth', map_location='cpu', weights_only=False)
    assert _equal(a['model'], b['model']) and _equal(a['distiller'], b['distiller'])

    # a finished init stage is skipped: one more main epoch only
    with contextlib.redirect_stdout(io.StringIO()):
        run(teacher, tmp_path, '--resume', 'auto', epochs=3)
    assert Toy.seen['init_steps'] == 0 and Toy.seen['epochs'] == [3]


# ---------------------------------------------------------------------------- facts in one place

def test_readme_method_table_is_the_generated_one():
    import subprocess
    import sys
    from scripts.methods import README_BEGIN, README_END
    generated = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'methods.py'), '--markdown'],
                               capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(REPO, 'README.md')) as f:
        readme = f.read()
    assert readme.count(README_BEGIN) == 1 and readme.count(README_END) == 1
    in_readme = readme.split(README_BEGIN)[1].split(README_END)[0].strip()
    assert in_readme == generated, 'regenerate the README table: python scripts/methods.py --markdown'
    for name, row in method_table().items():
        if name != 'toy':
            assert '| {} | {} |'.format(name, row['display_name']) in in_readme


def test_method_flags_live_with_their_methods_and_shared_ones_are_declared_once():
    import argparse
    from distiller_zoo import shared_argument
    parser = argparse.ArgumentParser()
    for cls in DISTILLERS.values():
        cls.add_arguments(parser.add_argument_group(cls.display_name))
    opt = parser.parse_args([])
    assert (opt.feat_dim, opt.nce_k, opt.hint_layer, opt.hkd_initial_weight) == (128, 16384, 1, 100)
    with pytest.raises(ValueError, match='--feat_dim'):
        shared_argument(parser, '--feat_dim', type=int, default=64)


def test_pair_weights_reach_the_sweep():
    from distiller_zoo.KD import KDDistiller
    from scripts.methods import read_methods, weight_lines

    @register('toy2')
    class Toy2(KDDistiller):
        weights = {'beta': 0.5}
        pair_weights = {('resnet32x4', 'resnet8x4'): {'beta': 2, 'hint_layer': 3}}
    try:
        table = read_methods()
    finally:
        unregister('toy2')
    assert table['toy2']['display_name'] == 'KD' and table['toy2']['source'] == table['kd']['source']  # inherited
    lines = [line for line in weight_lines(table) if line.startswith('toy2 ')]
    assert lines == ['toy2 * 1 1 0.5', 'toy2 resnet32x4:resnet8x4 1 1 2 --hint_layer 3']


# ---------------------------------------------------------------------------- the data-set wrapper

# CRD's contrast indices that the former per-data-set code (SyntheticImages(data_mode='crd'), which
# CIFAR100InstanceSample and ImageFolderSample copied) gave for 60 images of 5 classes, k=6,
# torch.manual_seed(0), items 0, 5, 17, 59: [index, positive, 6 negatives]
OLD_CRD_ITEMS = {
    'exact': [[0, 0, 1, 23, 11, 54, 34, 36], [5, 5, 28, 42, 25, 29, 26, 19], [17, 17, 11, 32, 13, 2, 20, 22],
              [59, 59, 27, 53, 28, 14, 38, 16]],
    'relax': [[0, 18, 1, 23, 11, 54, 34, 36], [5, 16, 56, 1, 28, 52, 2, 25], [17, 37, 32, 47, 40, 4, 25, 11],
              [59, 54, 53, 40, 31, 24, 10, 6]],
}
OLD_IMAGE_SUMS = {'exact': [-107.2934, -140.3845, -104.9319, 172.4218],
                  'relax': [-107.2934, -52.6714, -54.6326, -54.5093]}


@pytest.mark.parametrize('mode', ['exact', 'relax'])
def test_wrapper_draws_the_former_crd_indices(mode):
    from dataset.synthetic import SyntheticImages
    from dataset.wrappers import MethodData
    data = MethodData(SyntheticImages(60, train=True, num_classes=5), 'crd', k=6, mode=mode)
    torch.manual_seed(0)
    items = [data[i] for i in (0, 5, 17, 59)]
    assert [[int(it[2])] + it[3].tolist() for it in items] == OLD_CRD_ITEMS[mode]
    assert [round(float(it[0].sum()), 4) for it in items] == OLD_IMAGE_SUMS[mode]
