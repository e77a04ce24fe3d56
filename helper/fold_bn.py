"""The frozen teacher in inference form: each BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a fixed affine map per channel, so ``bn(conv(x))`` equals one
convolution with weight ``w * s`` and bias ``(b - mean) * s + beta``, where
``s = gamma / sqrt(var + eps)``. The teacher never trains, so its BatchNorms can be absorbed
once: every forward pass then skips a read and a write of each activation they touched.

``fold_bn`` works on a copy and leaves the model it is given untouched. The copy is for the
forward pass only: its folded BatchNorms are ``nn.Identity``, so anything that reads the
teacher's modules (OFD's ``get_bn_before_relu()`` statistics, a method that reuses the
classifier) must be given the original.

Which BatchNorm directly follows which convolution is learnt by running the model once with
hooks rather than by tracing its code: the models' forward passes take flags and slice
channels, which symbolic tracing cannot follow. A BatchNorm is folded only when its input is
the output of one convolution that nothing else reads: no other operation (a shortcut, an
in-place ReLU, a slice) and no returned feature, counted at the dispatcher; both layers must
run once per forward pass. (WRN's pre-activation BatchNorms follow additions and stay.) As a
last guard ``fold_bn`` checks that the logits and every ``is_feat``/``preact`` feature of the
copy equal the original's on the probe batch, raising ``FoldError`` otherwise.

On the CPU the folded copy then runs as a frozen TorchScript graph optimised for oneDNN
(``scripted_teacher``): each convolution's weights are reordered into oneDNN's blocked layout once
instead of at every call, and the activations stay in that layout from one convolution to the next
(converted back only where a feature is returned). It computes the same convolutions, so it equals
the folded copy up to float rounding (checked on a probe batch, else the folded copy runs as it is).
"""
import copy
import warnings

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class FoldError(RuntimeError):
    """Folding would change what the teacher computes (the caller keeps the unfolded teacher)."""


def _outputs(model, x):
    """Everything a method can read from a forward pass: logits, features, pre-activation features."""
    logits = model(x)
    feats, _ = model(x, is_feat=True)
    pre, _ = model(x, is_feat=True, preact=True)
    return [logits] + list(feats) + list(pre)


class _Readers(TorchDispatchMode):
    """Counts, for each tracked tensor, the operations that read it."""

    def __init__(self, tracked):
        super().__init__()
        self.tracked = tracked
        self.reads = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor) and id(a) in self.tracked:
                self.reads[id(a)] = self.reads.get(id(a), 0) + 1
        return func(*args, **(kwargs or {}))


def _conv_bn_pairs(model, x):
    """``({bn name: conv name}, _outputs(model, x))``, a pair for each BatchNorm2d that alone reads, every
    time, one Conv2d's output."""
    produced = {}  # id(conv output) -> (conv name, the tensor: kept so that its id stays its own)
    fed_by, calls, hooks = {}, {}, []

    def after_conv(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            produced[id(output)] = (name, output)
        return hook

    def before_bn(name):
        def hook(module, inputs):
            calls[name] = calls.get(name, 0) + 1
            entry = produced.get(id(inputs[0]))
            fed_by.setdefault(name, set()).add(entry[0] if entry is not None else None)
        return hook

    for name, module in model.named_modules():
        if type(module) is nn.Conv2d:
            hooks.append(module.register_forward_hook(after_conv(name)))
        elif isinstance(module, nn.BatchNorm2d) and module.track_running_stats:
            hooks.append(module.register_forward_pre_hook(before_bn(name)))
    try:
        with _Readers(produced) as readers:
            outputs = _outputs(model, x)
    finally:
        for h in hooks:
            h.remove()
    # a conv output that anything else reads too (a shortcut, an in-place ReLU, a returned feature) must
    # keep its value: its convolution stays as it is
    shared = {produced[key][0] for key in produced if readers.reads.get(key, 0) != 1}
    shared |= {produced[id(t)][0] for t in outputs if id(t) in produced}
    # _outputs runs three forward passes: a layer that runs once per pass ran three times
    pairs = {bn: convs.pop() for bn, convs in fed_by.items() if len(convs) == 1 and None not in convs
             and calls[bn] == 3}
    used = list(pairs.values())
    return {bn: conv for bn, conv in pairs.items()
            if calls[conv] == 3 and used.count(conv) == 1 and conv not in shared}, outputs


@torch.no_grad()
def _fold_into(conv, bn):
    # the per-channel constants in float64, so each folded weight is rounded about once
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    conv.weight.mul_(scale.to(conv.weight.dtype).view(-1, *([1] * (conv.weight.dim() - 1))))
    conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)


def fold_bn(model, probe, rtol=1e-3):
    """A frozen eval-mode copy of ``model`` with each BatchNorm2d that follows a Conv2d folded into it.

    ``probe``: a small input batch (e.g. 2 images) used to find the conv -> BN pairs and to
    check the copy. Raises ``FoldError`` when an output of the copy (logits, ``is_feat`` or
    ``preact`` features) differs from the original's by more than ``rtol`` of its largest entry.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pairs, expected = _conv_bn_pairs(model, probe)
    finally:
        model.train(was_training)
    folded = copy.deepcopy(model).eval().requires_grad_(False)
    modules = dict(folded.named_modules())
    for bn_name, conv_name in pairs.items():
        _fold_into(modules[conv_name], modules[bn_name])
        parent, _, child = bn_name.rpartition('.')
        setattr(modules[parent], child, nn.Identity())
    with torch.no_grad():
        got = _outputs(folded, probe)
    for i, (a, b) in enumerate(zip(got, expected)):
        if a.shape != b.shape or (a - b).abs().max() > rtol * b.abs().max().clamp(min=1e-6):
            raise FoldError('folding BatchNorm into the convolutions changes output {} of {} by {:.3g}'.format(
                i, type(model).__name__, float((a - b).abs().max()) if a.shape == b.shape else float('nan')))
    return folded


def count_folded(original, folded):
    """How many BatchNorm2d layers ``fold_bn`` removed."""
    def count(m):
        return sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    return count(original) - count(folded)


class _Features(nn.Module):
    """``model(x, is_feat=True, preact=preact)`` as a one-argument module, for tracing."""

    def __init__(self, model, preact):
        super().__init__()
        self.model, self.preact = model, preact

    def forward(self, x):
        return self.model(x, is_feat=True, preact=self.preact)


class ScriptedTeacher(nn.Module):
    """The teacher's call signature over a frozen graph traced for one ``preact`` mode; calls with the other
    mode run the eager ``model``. Logits alone (validation) come from the graph whatever ``preact`` is."""

    def __init__(self, model, graph, preact):
        super().__init__()
        self.model, self.graph, self.preact = model, graph, preact

    def forward(self, x, is_feat=False, preact=False):
        if not is_feat:
            return self.graph(x)[1]
        if preact != self.preact:
            return self.model(x, is_feat=True, preact=preact)
        feats, logits = self.graph(x)
        return list(feats), logits


def scripted_teacher(model, probe, preact=False, rtol=1e-4):
    """``model`` (an eval-mode teacher already on the CPU, in its memory format) as a ``ScriptedTeacher``.

    ``probe``: a few images, traced with two of them (the graph does not fix the batch size: it is
    checked on all of them). Raises ``FoldError`` when tracing fails or an output differs from the
    eager model's by more than ``rtol`` of its largest entry.
    """
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.compile, which costs 20-60 s of compilation per run
        # here and measured slower; these calls are guarded by the check below and the eager fallback
        warnings.simplefilter('ignore')
        try:
            traced = torch.jit.trace(_Features(model, preact).eval(), probe[:2], check_trace=False)
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            teacher = ScriptedTeacher(model, graph, preact).eval()
            # TorchScript profiles the first call and optimises the graph in the second (comparing its
            # constants, on the host): both here, not in the first training step
            for _ in range(3):
                got = teacher(probe, is_feat=True, preact=preact)
        except Exception as e:  # tracing raises many kinds; the eager teacher runs instead
            raise FoldError('TorchScript could not trace {}: {}'.format(
                type(model).__name__, str(e).splitlines()[0][:200] if str(e) else type(e).__name__))
        expected = model(probe, is_feat=True, preact=preact)
    got, expected = list(got[0]) + [got[1]], list(expected[0]) + [expected[1]]
    for i, (a, b) in enumerate(zip(got, expected)):
        if a.shape != b.shape or (a - b).abs().max() > rtol * b.abs().max().clamp(min=1e-6):
            raise FoldError('the TorchScript teacher changes output {} of {}'.format(i, type(model).__name__))
    return teacher


def frozen_teacher(model, probe, fold=True, log=print):
    """The module the training step runs as the teacher: ``fold_bn(model, probe)``, or ``model`` itself
    when ``fold`` is False (``--no_fold_teacher``) or folding would change one of its outputs."""
    if not fold:
        return model
    try:
        folded = fold_bn(model, probe)
    except FoldError as e:
        log('==> the teacher runs unfolded: {}'.format(e))
        return model
    log('==> teacher: {} BatchNorm layers folded into its convolutions (--no_fold_teacher keeps them)'.format(
        count_folded(model, folded)))
    return folded
