"""The training loop against ground truth computed in the test: the objective by hand, the
learning-rate schedule, --save_freq and --nan-policy skip."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import train_student
import train_teacher
from conftest import run_in_process
from distiller_zoo import DISTILLERS
from distiller_zoo.registry import preact_modes
from helper.loops import MAX_SKIPPED_STEPS, NonFiniteLoss, to_batch, train_epoch, train_step, unwrap
from helper.trainer import setup_device

# weights that no mix-up of two of them could hide
GAMMA, ALPHA, BETA, KD_T = 0.3, 0.7, 1.9, 3.0
TINY = ['--dataset', 'synthetic', '--synthetic_train_size', '32', '--synthetic_val_size', '16', '--batch_size', '16',
        '--num_workers', '0', '--seed', '0']


@pytest.fixture(scope='module')
def path_t(teacher_run):
    return teacher_run[0] / 'resnet8_best.pth'


def build(path_t, distill, *extra):
    """A student run of ``distill`` (wrn_16_1 <- resnet8) as train_student.py sets it up, without its loop."""
    opt = train_student.parse_option(['--path-t', str(path_t), '--model_s', 'wrn_16_1', '--distill', distill,
                                      '-r', str(GAMMA), '-a', str(ALPHA), '-b', str(BETA), '--kd_T', str(KD_T),
                                      '--nce_k', '16', '--learning_rate', '0.01'] + TINY + list(extra))
    opt.distributed, opt.rank, opt.world_size, opt.local_rank = False, 0, 1, 0
    device = setup_device(opt)
    trainer = train_student.build_trainer(opt, device)
    trainer.train_sampler.set_epoch(1)
    x, batch = to_batch(next(iter(trainer.train_loader)), device)
    return opt, device, trainer, x, batch


def cross_entropy_by_hand(logits, target):
    z = logits.detach().double().cpu().numpy()
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.mean(log_p[np.arange(len(target)), target.cpu().numpy()])


def kl_by_hand(logit_s, logit_t, T):
    """T^2 * mean over the batch of KL(softmax(t/T) || softmax(s/T)), summed over classes."""
    def log_softmax(z):
        z = z.detach().double().cpu().numpy() / T
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    log_p_s, log_p_t = log_softmax(logit_s), log_softmax(logit_t)
    return T * T * np.mean((np.exp(log_p_t) * (log_p_t - log_p_s)).sum(axis=1))


def method_total(out):
    """A method's loss: one tensor, or the sum of its named terms."""
    out = sum(out.values()) if isinstance(out, dict) else out
    return float(out.detach())


@pytest.mark.parametrize('distill', sorted(DISTILLERS))
def test_one_step_of_the_objective(path_t, distill, *flags):
    """loss = gamma*CE + alpha*KL_T + beta*term, by hand; the teacher (BN statistics included)
    does not move; every trainable parameter of student and method is stepped by the optimiser."""
    # --init_epochs 0: the main stage's step (an init stage would train other modules first)
    opt, device, trainer, x, batch = build(path_t, distill, '--init_epochs', '0', *flags)
    objective = trainer.objective
    objective.train()
    model_s, model_t = unwrap(objective.model_s), objective.model_t
    distiller = unwrap(objective.distiller)
    method = type(distiller)
    preact_s, preact_t = preact_modes(method)

    # the ground truth on copies, from the same state and the same random stream (one deepcopy, so
    # hooks a method keeps on the models stay wired to the copied method)
    rng = torch.get_rng_state()
    s, t, d = copy.deepcopy((model_s, model_t, distiller))
    s.train(), t.train(method.teacher_train_mode), d.train()

    def outputs(inputs):
        feat_s, logit_s = s(inputs, is_feat=True, preact=preact_s)
        with torch.no_grad():
            feat_t, logit_t = t(inputs, is_feat=True, preact=preact_t)
        return feat_s, feat_t, logit_s, logit_t
    feat_s, feat_t, logit_s, logit_t = outputs(x)
    given = dict(batch, view_outputs=[outputs(v) for v in batch['views']]) if method.extra_views else batch
    term = method_total(d(feat_s, feat_t, logit_s, logit_t, given))
    want = GAMMA * cross_entropy_by_hand(logit_s, batch['target']) + BETA * term
    if not getattr(method, 'replaces_kd', False):
        want += ALPHA * kl_by_hand(logit_s, logit_t, KD_T)
    torch.set_rng_state(rng)

    teacher_before = {k: v.clone() for k, v in model_t.state_dict().items()}
    # the teacher that runs has its BatchNorms folded in by default, unless the method needs them
    # (test_the_unfolded_teacher_keeps_its_batchnorm_statistics checks those)
    assert teacher_before
    if '--no_fold_teacher' in flags:
        assert any(k.endswith('running_mean') for k in teacher_before)
    trained = [(name, p) for module in (model_s, distiller) for name, p in module.named_parameters()
               if p.requires_grad]
    before = [p.detach().clone() for _, p in trained]
    loss, _, _ = train_step(objective, trainer.optimizer, x, batch, opt, device)

    loss = float(loss.detach())
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-6), (loss, want)
    # a teacher kept in train mode (OFD's reference quirk) updates running BN statistics nothing reads
    moving = {k for k in teacher_before if 'running_' in k or 'num_batches' in k} if method.teacher_train_mode else set()
    for k, v in model_t.state_dict().items():
        assert k in moving or torch.equal(v, teacher_before[k]), k
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group['params']}
    assert not any(id(p) in in_optimizer for p in model_t.parameters())
    for (name, p), old in zip(trained, before):
        assert id(p) in in_optimizer, name
        assert not torch.equal(p.detach(), old), name + ' did not change in a step'


@pytest.mark.parametrize('distill', ['kd', 'semckd'])
def test_the_unfolded_teacher_keeps_its_batchnorm_statistics(path_t, distill):
    """The same step with --no_fold_teacher: the teacher's running statistics exist and do not move."""
    test_one_step_of_the_objective(path_t, distill, '--no_fold_teacher')


def lr_by_hand(epoch, lr, rate, decay_epochs):
    """The step rule: the rate applies once for every decay epoch already finished."""
    for e in decay_epochs:
        if epoch > e:
            lr *= rate
    return lr


def test_lr_schedule_and_save_freq(tmp_path):
    """--epochs 4 --lr_decay_epochs 1,3: lr 0.1, 0.02, 0.02, 0.004 in metrics.jsonl and the optimiser;
    --save_freq 3 keeps ckpt_epoch_3 and the last epoch's ckpt_epoch_4, nothing else."""
    run_in_process(train_teacher.main, ['--model', 'resnet8', '--epochs', '4', '--lr_decay_epochs', '1,3',
                                        '--learning_rate', '0.1', '--lr_decay_rate', '0.2', '--save_freq', '3']
                   + TINY, tmp_path)
    folder = tmp_path / 'save' / 'models' / 'resnet8_synthetic_lr_0.1_decay_0.0005_trial_0'
    metrics = [json.loads(line) for line in open(folder / 'metrics.jsonl')]
    want = [lr_by_hand(e, 0.1, 0.2, [1, 3]) for e in (1, 2, 3, 4)]
    assert want == pytest.approx([0.1, 0.02, 0.02, 0.004], rel=1e-12)
    assert [m['epoch'] for m in metrics] == [1, 2, 3, 4]
    assert [m['lr'] for m in metrics] == pytest.approx(want, rel=1e-12)
    last = torch.load(folder / 'resnet8_last.pth', weights_only=False)
    assert [g['lr'] for g in last['optimizer']['param_groups']] == pytest.approx([want[-1]], rel=1e-12)

    assert sorted(p.name for p in folder.glob('ckpt_epoch_*.pth')) == ['ckpt_epoch_3.pth', 'ckpt_epoch_4.pth']
    kept = {e: torch.load(folder / 'ckpt_epoch_{}.pth'.format(e), weights_only=False) for e in (3, 4)}
    assert kept[3]['epoch'] == 3 and kept[4]['epoch'] == 4
    for name, value in last['model'].items():
        assert torch.equal(kept[4]['model'][name], value), name
    assert any(not torch.equal(kept[3]['model'][n], v) for n, v in last['model'].items())


class NaNAt(nn.Module):
    """The objective, with the loss of the calls numbered in ``bad`` (from 0) made NaN, as an
    overflowing loss term would."""

    def __init__(self, objective, bad):
        super().__init__()
        self.objective, self.bad, self.calls = objective, set(bad), 0

    def forward(self, x, batch):
        loss, logits, terms = self.objective(x, batch)
        self.calls += 1
        if self.calls - 1 in self.bad:
            loss = loss * float('nan')
        return loss, logits, terms


def trained_state(trainer):
    """Every parameter and the optimiser's momentum, as copies."""
    params = [p.detach().clone() for g in trainer.optimizer.param_groups for p in g['params']]
    momentum = [trainer.optimizer.state[p]['momentum_buffer'].clone() if p in trainer.optimizer.state else None
                for g in trainer.optimizer.param_groups for p in g['params']]
    return params, momentum


def same(a, b):
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


def test_nan_policy_skip_leaves_the_step_out(path_t):
    opt, device, trainer, x, batch = build(path_t, 'kd', '--nan-policy', 'skip')
    objective = NaNAt(trainer.objective, bad={1})
    objective.train()
    assert train_step(objective, trainer.optimizer, x, batch, opt, device)[0] is not None
    params, momentum = trained_state(trainer)
    assert train_step(objective, trainer.optimizer, x, batch, opt, device) == (None, None, None)
    after = trained_state(trainer)
    assert same(params, after[0]) and same(momentum, after[1])  # no update, no momentum
    assert train_step(objective, trainer.optimizer, x, batch, opt, device)[0] is not None
    assert not same(params, trained_state(trainer)[0])  # the next good step updates again

    # the limit: MAX_SKIPPED_STEPS skipped steps in an epoch are accepted, one more stops the run
    small = (x[:2], batch['target'][:2])
    limit = [small] * (MAX_SKIPPED_STEPS + 1)
    opt.print_freq = 1000
    result = train_epoch(1, limit, NaNAt(trainer.objective, bad=range(MAX_SKIPPED_STEPS)), trainer.optimizer, opt,
                         device, log=lambda *a: None)
    assert result['skipped_steps'] == MAX_SKIPPED_STEPS
    with pytest.raises(NonFiniteLoss, match='more than {} steps'.format(MAX_SKIPPED_STEPS)):
        train_epoch(2, limit + [small], NaNAt(trainer.objective, bad=range(MAX_SKIPPED_STEPS + 1)),
                    trainer.optimizer, opt, device, log=lambda *a: None)
