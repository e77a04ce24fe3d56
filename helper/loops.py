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

from distiller_zoo.registry import DEFAULT_TERM
from helper.errors import UserError
from helper.util import Meter, TermMeter, format_eta

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

    def on_epoch_start(self, epoch):
        pass


LOOP_TERMS = ('cls', 'div')


def as_terms(out, name=DEFAULT_TERM):
    """A method's output -> its named terms: a tensor is ``{name: tensor}``."""
    terms = dict(out) if isinstance(out, dict) else {name: out}
    clash = [name for name in terms if name in LOOP_TERMS]
    if clash:
        raise ValueError('a method may not name its loss terms {} (the loop\'s own terms)'.format(', '.join(clash)))
    return terms


class DistillObjective(nn.Module):
    """``gamma * CE + alpha * KL_T(student, teacher) + beta * sum(method's terms)``.

    What the method needs (pre-activation features, no KL term, extra views, its own prediction
    for the training accuracy) comes from its attributes; the loop never asks which method runs.
    A method with ``extra_views`` gets ``batch['view_outputs']``: ``(feat_s, feat_t, logit_s,
    logit_t)`` of each of ``batch['views']``.
    """

    def __init__(self, model_s, model_t, distiller, opt):
        super().__init__()
        from distiller_zoo import DistillKL
        from distiller_zoo.registry import preact_modes
        self.model_s = model_s
        self.model_t = model_t
        self.distiller = distiller
        method = unwrap(distiller)
        self.preact_s, self.preact_t = preact_modes(type(method))
        self.replaces_kd = method.replaces_kd  # the instance's: a switch (kd --logit_stand) may set it
        self.changes_prediction = method.changes_prediction
        self.extra_views = method.extra_views
        self.teacher_train_mode = method.teacher_train_mode
        self.criterion_div = DistillKL(opt.kd_T)
        self.gamma, self.alpha, self.beta = opt.gamma, opt.alpha, opt.beta

    def train(self, mode=True):
        super().train(mode)
        # the teacher is frozen: never updated by the optimiser, and in eval mode unless the method
        # keeps a reference that ran it in train mode (its BN layers then normalise with the batch's
        # statistics and update running ones that nothing reads)
        self.model_t.train(mode and self.teacher_train_mode)
        return self

    def on_epoch_start(self, epoch):
        unwrap(self.distiller).on_epoch_start(epoch)

    def features(self, x, model_s=None):
        """(feat_s, feat_t, logit_s, logit_t) of one batch; the teacher's without gradient."""
        model_s = self.model_s if model_s is None else model_s
        feat_s, logit_s = model_s(x, is_feat=True, preact=self.preact_s)
        with torch.no_grad():
            feat_t, logit_t = self.model_t(x, is_feat=True, preact=self.preact_t)
        return feat_s, feat_t, logit_s, logit_t

    def method_terms(self, loss_fn, feat_s, feat_t, logit_s, logit_t, batch, name=DEFAULT_TERM):
        """The method's named terms: the one place where a method's loss is computed (main and
        init stage alike)."""
        return as_terms(loss_fn(feat_s, feat_t, logit_s, logit_t, batch), name)

    def forward(self, x, batch):
        feat_s, feat_t, logit_s, logit_t = self.features(x)
        if self.extra_views:
            # each extra view through the same student (its own forward, as the references run them) and teacher
            batch = dict(batch, view_outputs=[float32(*self.features(view)) for view in batch['views']])
        # The models may run under autocast, the losses never: Gram matrices, distances and
        # softmaxes of low-precision features overflow in fp16 and lose most digits in bf16.
        # Every term (the method's adapters included) runs in float32 on float32 copies.
        with loss_precision(x.device):
            feat_s, feat_t, logit_s, logit_t = float32(feat_s, feat_t, logit_s, logit_t)
            loss_cls = F.cross_entropy(logit_s, batch['target'])
            terms = {'cls': loss_cls}
            loss = self.gamma * loss_cls
            if not self.replaces_kd:
                loss_div = self.criterion_div(logit_s, logit_t)
                terms['div'] = loss_div
                loss = loss + self.alpha * loss_div
            method = self.method_terms(self.distiller, feat_s, feat_t, logit_s, logit_t, batch)
            loss = loss + self.beta * sum(method.values())
        terms.update(method)
        # the training accuracy of a method that changes the prediction is that prediction's
        logits = unwrap(self.distiller).train_prediction if self.changes_prediction else logit_s
        return loss, logits, terms


class InitObjective(nn.Module):
    """The loss of a method's init stage: its ``init_loss`` alone, unweighted.

    As RepDistiller's ``helper/pretrain.py``: student, teacher and distiller in eval mode but
    for the modules the stage trains. The student runs unwrapped (no DDP: the stage trains only
    some of its modules, if any); ``sync_gradients`` averages the trained gradients over the
    processes instead.
    """

    def __init__(self, objective, stage):
        super().__init__()
        self.objective = objective
        self.trained = nn.ModuleList(stage.modules_to_train)
        self.frozen = stage.frozen

    def train(self, mode=True):
        self.objective.train(False)
        for module in self.trained:
            module.train(mode)
        self.training = mode
        return self

    def on_epoch_start(self, epoch):
        pass

    def finish(self):
        """Freeze again the modules that only the stage trains (see ``InitStage``)."""
        for p in self.frozen:
            p.requires_grad_(False)

    def forward(self, x, batch):
        o = self.objective
        feat_s, feat_t, logit_s, logit_t = o.features(x, model_s=unwrap(o.model_s))
        with loss_precision(x.device):
            feat_s, feat_t, logit_s, logit_t = float32(feat_s, feat_t, logit_s, logit_t)
            terms = o.method_terms(unwrap(o.distiller).init_loss, feat_s, feat_t, logit_s, logit_t, batch, 'init')
        return sum(terms.values()), logit_s, terms

    def sync_gradients(self):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        for p in self.trained.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)


def to_batch(data, device):
    """Any loader's batch -> (x, batch dict) on ``device``.

    Loaders yield ``(x, y)``, ``(x, y, index)``, ``(x, y, index, contrast_idx)``, or a dict with
    ``'input'``, ``'target'`` and any of ``'index'``, ``'contrast_idx'`` and ``'views'`` (a list
    of extra views of the input).
    """
    if not isinstance(data, dict):
        data = dict(zip(('input', 'target', 'index', 'contrast_idx'), data))

    def move(v):
        return [move(u) for u in v] if isinstance(v, (list, tuple)) else v.to(device, non_blocking=True)

    batch = {k: move(v) for k, v in data.items() if k != 'input'}
    batch['target'] = batch['target'].reshape(-1).long()
    return move(data['input']), batch


def autocast(opt, device):
    if getattr(opt, 'amp', None) is None:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if opt.amp == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_precision(device):
    """Autocast off, whatever the caller turned on: losses are computed in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def float32(feat_s, feat_t, logit_s, logit_t):
    """float32 copies of one pass's features and logits (the losses' inputs; a no-op in float32)."""
    return [f.float() for f in feat_s], [f.float() for f in feat_t], logit_s.float(), logit_t.float()


def _prepare_input(x, opt):
    return x.contiguous(memory_format=torch.channels_last) if getattr(opt, 'channels_last', False) else x


def _prepare_batch(batch, opt):
    if 'views' in batch:
        batch['views'] = [_prepare_input(v, opt) for v in batch['views']]
    return batch


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
        sync = getattr(objective, 'sync_gradients', None)
        if sync is not None:
            sync()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        sync = getattr(objective, 'sync_gradients', None)
        if sync is not None:
            sync()
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
                eta_epochs_left=0, label='Epoch'):
    """Train one epoch; returns dict(train_acc, train_acc_top5, train_loss, data_time_s, epoch_time_s,
    loss_<term> for every named loss term, ...)."""
    objective.train()
    meter = Meter(device)
    term_meter = TermMeter(device)
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
        batch = _prepare_batch(batch, opt)
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
        term_meter.update(terms, batch['target'].size(0))

        if (idx + 1) % opt.print_freq == 0 or idx + 1 == n_steps:
            watch.check(epoch)
            now = time.time()
            top1, top5, avg_loss, n_seen = meter.values()
            step_time = (now - mark_time) / max(idx + 1 - mark_step, 1)
            steps_left = n_steps - idx - 1
            eta = step_time * (steps_left + eta_epochs_left * n_steps)
            # images over time since the last line: a short last batch does not pass for a slow one
            img_per_s = (n_seen - mark_seen) / max(now - mark_time, 1e-9)
            log('{} [{}][{}/{}]  loss {:.4f}{}  acc@1 {:.2f}  acc@5 {:.2f}  {:.0f} img/s  data {:.0f}%  '
                'ETA epoch {} / run {}'.format(
                    label, epoch, idx + 1, n_steps, avg_loss, term_meter.brief(), top1, top5, img_per_s,
                    100.0 * data_time / max(now - start, 1e-9), format_eta(step_time * steps_left),
                    format_eta(eta)))
            sys.stdout.flush()
            mark_time, mark_step, mark_seen = now, idx + 1, n_seen
        end = time.time()
    watch.check(epoch)
    meter.all_reduce()
    term_meter.all_reduce()
    top1, top5, avg_loss, n_seen = meter.values()
    if n_seen == 0 and n_steps > 0:
        raise UserError('no training step ran in epoch {}: the training set holds fewer images than one batch '
                        '(--batch_size {})'.format(epoch, opt.batch_size))
    record = {'train_acc': top1, 'train_acc_top5': top5, 'train_loss': avg_loss,
              'data_time_s': data_time, 'epoch_time_s': time.time() - start, 'skipped_steps': skipped}
    record.update(('loss_' + name, value) for name, value in term_meter.values().items())
    return record


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
