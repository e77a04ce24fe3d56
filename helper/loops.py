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
        never = torch.iinfo(torch.long).max
        first = torch.where(self.first_step < 0, never, self.first_step).view(1)
        bad = self.bad_terms.long() if self.bad_terms is not None else first.new_zeros(0)
        # one verdict for all processes (one that stopped alone would leave the others waiting in a
        # collective): the earliest bad step and the terms that failed anywhere, in one MIN-reduction
        facts = torch.cat([first, -bad])
        if _distributed():
            facts = _across_processes(facts, torch.distributed.ReduceOp.MIN)
        step = int(facts[0])
        if step != never:
            names = [n for n, b in zip(self.names or [], (-facts[1:]).tolist()) if b] or ['loss']
            raise NonFiniteLoss('loss became non-finite at epoch {} step {} (term: {}); the last good checkpoint '
                                'is kept — lower the learning rate or -b, or try --nan-policy skip'
                                .format(epoch, step, ', '.join(names)))


def _distributed():
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _across_processes(t, op):
    """``t`` reduced with ``op`` over the processes of a DDP run."""
    t = t.clone()
    torch.distributed.all_reduce(t, op=op)
    return t


def train_step(objective, optimizer, x, batch, opt, device, scaler=None):
    """Forward, backward and optimiser step of one batch -> (loss, logits, terms), all on the device.

    With ``--nan-policy skip`` a non-finite loss on any process skips the update on all of them
    and returns Nones; knowing that costs one host sync (and under DDP one all-reduce) per
    step, so only that policy pays it.
    """
    with autocast(opt, device):
        loss, logits, terms = objective(x, batch)
    if getattr(opt, 'nan_policy', 'stop') == 'skip' and _skip(loss):
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


def _skip(loss):
    """Whether the step is skipped: its loss is not finite on this process or on any other (under DDP every
    process must skip together, or gradient all-reduces of different steps would pair up)."""
    bad = (~torch.isfinite(loss.detach())).any().long().view(1)
    if _distributed():
        bad = _across_processes(bad, torch.distributed.ReduceOp.MAX)
    return bool(bad)


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
    mark_time, mark_step, mark_seen = start, 0, 0
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
            # images over time since the last line: a short last batch does not pass for a slow one
            img_per_s = (n_seen - mark_seen) / max(now - mark_time, 1e-9)
            log('Epoch [{}][{}/{}]  loss {:.4f}  acc@1 {:.2f}  acc@5 {:.2f}  {:.0f} img/s  data {:.0f}%  '
                'ETA epoch {} / run {}'.format(
                    epoch, idx + 1, n_steps, avg_loss, top1, top5, img_per_s,
                    100.0 * data_time / max(now - start, 1e-9), format_eta(step_time * steps_left),
                    format_eta(eta)))
            sys.stdout.flush()
            mark_time, mark_step, mark_seen = now, idx + 1, n_seen
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
    """Top-1 %, top-5 % and mean cross-entropy of ``model`` on ``loader`` (reduced across processes)."""
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
