"""One epoch of training and one pass of validation, for any objective.

The loop knows nothing about the distillation method: an objective maps a batch to
``(loss, logits, terms)`` and the loop does the optimiser step, the device-side
metrics, the progress line and the non-finite-loss guard.
"""
import contextlib
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError
from helper.util import Meter, format_eta

MAX_SKIPPED_STEPS = 20


class NonFiniteLoss(UserError):
    """A loss term became NaN or infinite; the message names epoch, step and term.

    A UserError so that the entry scripts report it in one line: the fix (a lower learning
    rate or loss weight) is the user's to make.
    """


def unwrap(module):
    """The module inside a DistributedDataParallel / torch.compile wrapper."""
    module = getattr(module, '_orig_mod', module)
    return getattr(module, 'module', module)


class ClassifierObjective(nn.Module):
    """Plain cross-entropy training (teachers and baseline students)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, batch):
        logits = self.model(x)
        loss = F.cross_entropy(logits, batch['target'])
        return loss, logits, {'cls': loss}


class DistillObjective(nn.Module):
    """``gamma * CE + alpha * KL_T(student, teacher) + beta * distiller(...)``."""

    def __init__(self, model_s, model_t, distiller, opt):
        super().__init__()
        from distiller_zoo import DistillKL
        self.model_s = model_s
        self.model_t = model_t
        self.distiller = distiller
        self.criterion_div = DistillKL(opt.kd_T)
        self.gamma, self.alpha, self.beta = opt.gamma, opt.alpha, opt.beta

    def train(self, mode=True):
        super().train(mode)
        self.model_t.eval()  # the teacher is frozen, BN statistics included
        return self

    def forward(self, x, batch):
        feat_s, logit_s = self.model_s(x, is_feat=True)
        with torch.no_grad():
            feat_t, logit_t = self.model_t(x, is_feat=True)
        # The models may run under autocast, the losses never: Gram matrices, distances and
        # softmaxes of low-precision features overflow in fp16 and lose most digits in bf16.
        # Every term (the method's adapters included) runs in float32 on float32 copies.
        with loss_precision(x.device):
            feat_s, feat_t = [f.float() for f in feat_s], [f.float() for f in feat_t]
            logit_s, logit_t = logit_s.float(), logit_t.float()
            loss_cls = F.cross_entropy(logit_s, batch['target'])
            loss_div = self.criterion_div(logit_s, logit_t)
            loss_kd = self.distiller(feat_s, feat_t, logit_s, logit_t, batch)
            loss = self.gamma * loss_cls + self.alpha * loss_div + self.beta * loss_kd
        return loss, logit_s, {'cls': loss_cls, 'div': loss_div, 'kd': loss_kd}


def to_batch(data, device):
    """Any loader's batch -> (x, batch dict) on ``device``.

    Loaders yield ``(x, y)``, ``(x, y, index)`` or ``(x, y, index, contrast_idx)``.
    """
    keys = ('target', 'index', 'contrast_idx')
    x = data[0].to(device, non_blocking=True)
    batch = {k: v.to(device, non_blocking=True) for k, v in zip(keys, data[1:])}
    batch['target'] = batch['target'].reshape(-1).long()
    return x, batch


def autocast(opt, device):
    if getattr(opt, 'amp', None) is None:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if opt.amp == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_precision(device):
    """Autocast off, whatever the caller turned on: losses are computed in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def _prepare_input(x, opt):
    return x.contiguous(memory_format=torch.channels_last) if getattr(opt, 'channels_last', False) else x


class _NonFiniteWatch:
    """Records, on the device, the first step whose loss terms were not finite."""

    def __init__(self, device):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.names = None
        self.bad_terms = None

    def update(self, step, terms):
        if self.names is None:
            self.names = list(terms)
            self.bad_terms = torch.zeros(len(self.names), dtype=torch.bool, device=self.first_step.device)
        bad = torch.stack([~torch.isfinite(torch.as_tensor(terms[n], device=self.first_step.device)).all()
                           for n in self.names])
        new = bad.any() & (self.first_step < 0)
        self.first_step = torch.where(new, torch.full_like(self.first_step, step), self.first_step)
        self.bad_terms = torch.where(new, bad, self.bad_terms)

    def check(self, epoch):
        step = int(self.first_step)
        if step >= 0:
            names = [n for n, b in zip(self.names, self.bad_terms.tolist()) if b] or ['loss']
            raise NonFiniteLoss('loss became non-finite at epoch {} step {} (term: {}); the last good checkpoint '
                                'is kept — lower the learning rate or -b, or try --nan-policy skip'
                                .format(epoch, step, ', '.join(names)))


def train_step(objective, optimizer, x, batch, opt, device, scaler=None):
    """Forward, backward and optimiser step of one batch -> (loss, logits, terms), all on the device.

    With ``--nan-policy skip`` a non-finite loss skips the update and returns Nones; knowing
    that costs one host sync per step, so only that policy pays it.
    """
    with autocast(opt, device):
        loss, logits, terms = objective(x, batch)
    if getattr(opt, 'nan_policy', 'stop') == 'skip' and not bool(torch.isfinite(loss)):
        optimizer.zero_grad(set_to_none=True)
        return None, None, None
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss, logits, terms


def train_epoch(epoch, loader, objective, optimizer, opt, device, scaler=None, log=print, n_steps=None,
                eta_epochs_left=0):
    """Train one epoch; returns dict(train_acc, train_acc_top5, train_loss, data_time_s, epoch_time_s, ...)."""
    objective.train()
    meter = Meter(device)
    watch = _NonFiniteWatch(device)
    n_steps = n_steps if n_steps is not None else len(loader)
    skipped = 0
    data_time = 0.0
    start = time.time()
    mark_time, mark_step = start, 0
    end = start
    for idx, data in enumerate(loader):
        data_time += time.time() - end
        x, batch = to_batch(data, device)
        x = _prepare_input(x, opt)
        loss, logits, terms = train_step(objective, optimizer, x, batch, opt, device, scaler)
        if loss is None:
            skipped += 1
            if skipped > MAX_SKIPPED_STEPS:
                raise NonFiniteLoss('more than {} steps with a non-finite loss in epoch {} (last at step {}); '
                                    'stopping'.format(MAX_SKIPPED_STEPS, epoch, idx))
            end = time.time()
            continue
        if opt.nan_policy != 'skip':
            watch.update(idx, terms)
        meter.update(loss, logits, batch['target'])

        if (idx + 1) % opt.print_freq == 0 or idx + 1 == n_steps:
            watch.check(epoch)
            now = time.time()
            top1, top5, avg_loss, n_seen = meter.values()
            step_time = (now - mark_time) / max(idx + 1 - mark_step, 1)
            steps_left = n_steps - idx - 1
            eta = step_time * (steps_left + eta_epochs_left * n_steps)
            log('Epoch [{}][{}/{}]  loss {:.4f}  acc@1 {:.2f}  acc@5 {:.2f}  {:.0f} img/s  data {:.0f}%  '
                'ETA epoch {} / run {}'.format(
                    epoch, idx + 1, n_steps, avg_loss, top1, top5, x.size(0) / max(step_time, 1e-9),
                    100.0 * data_time / max(now - start, 1e-9), format_eta(step_time * steps_left),
                    format_eta(eta)))
            sys.stdout.flush()
            mark_time, mark_step = now, idx + 1
        end = time.time()
    watch.check(epoch)
    meter.all_reduce()
    top1, top5, avg_loss, n_seen = meter.values()
    if n_seen == 0 and n_steps > 0:
        raise UserError('no training step ran in epoch {}: the training set holds fewer images than one batch '
                        '(--batch_size {})'.format(epoch, opt.batch_size))
    return {'train_acc': top1, 'train_acc_top5': top5, 'train_loss': avg_loss,
            'data_time_s': data_time, 'epoch_time_s': time.time() - start, 'skipped_steps': skipped}


@torch.no_grad()
def validate(loader, model, opt, device):
    """Top-1 %, top-5 % and mean cross-entropy of ``model`` on ``loader`` (reduced across processes).

    A measurement leaves the run's random streams alone: a DataLoader iterator takes its base
    seed from torch's global generator, and a resumed run evaluates its teacher after restoring
    that generator, so a draw here would shift every later augmentation.
    """
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        return _validate(loader, model, opt, device)


def _validate(loader, model, opt, device):
    model.eval()
    meter = Meter(device)
    for data in loader:
        x, batch = to_batch(data, device)
        x = _prepare_input(x, opt)
        with autocast(opt, device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), batch['target'])
        meter.update(loss, logits, batch['target'])
    meter.all_reduce()
    top1, top5, loss, _ = meter.values()
    return top1, top5, loss
