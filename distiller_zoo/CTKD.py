"""CTKD: Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023.

Reference code: zhengli97/CTKD (commit 7d52522) ``models/temp_global.py`` (``Global_T``, the gradient
reversal), ``train_student.py`` (``--t_start/--t_end``, ``CosineDecay``, the optimiser), ``helper/loops.py``
(the temperature and the losses), ``distiller_zoo/KD.py`` (``DistillKL`` with a tensor temperature) and
``scripts/run_cifar_distill.sh`` (the published run).

KD's temperature becomes a learned scalar trained *against* the student: ``Global_T`` holds one parameter
(initialised to 1) and returns it through a gradient-reversal layer; the temperature is
``t_start + t_end * sigmoid(that) = 1 + 20 * sigmoid(global_T)``, in (1, 21), 15.62 at the start. The
reversal layer is the identity forward and multiplies the gradient by ``lambda_`` on the way back. Its
docstring says "-lambda", but the code multiplies by ``+lambda_``; the reversal comes from the schedule,
which makes lambda negative: ``CosineDecay(max_value=0, min_value=-1, num_loops=10)`` evaluated at the
1-based epoch before each epoch, ``lambda(e) = -1 + (cos(pi * min(e, 10) / 10) + 1) / 2``: -0.0245 in
epoch 1 (never exactly 0), -0.5 in epoch 5, -1 from epoch 10 on. (The README and the layer's docstring
describe a gradient times ``-lambda`` with lambda increasing; the same thing with the sign moved.) The
temperature parameter is in the optimiser with the student's lr, momentum and weight decay.

The loss it wraps is the KD term itself: ``-a`` times KL at the learned temperature, ``T^2`` factor and
batch mean (``kd_loss`` in LS.py with a tensor temperature is exactly the reference's ``DistillKL(y_s, y_t,
temp)``; with LS it standardises both logits, which is the reference LS's ``DistillKL_logit_stand``). So
CTKD replaces the ``-a`` term: the loop must not add its own KL at ``--kd_T`` (unused by the reference once
the temperature is learned).

Reference values (``scripts/run_cifar_distill.sh``, resnet56 -> resnet20, the only published command):
``-r 0.1 -a 0.9 -b 0 --kd_T 4``, batch 64, lr 0.05 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2, set in
``parse_option``), steps at 150/180/210, weight decay 5e-4, ``--have_mlp 1 --mlp_name global
--cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10``, t_start 1, t_end 20 (parser defaults).
No per-pair values are published; the 73.39 reported for resnet32x4 -> resnet8x4 (LS's README) used these.
With LS: ``-r 0.1 -a 9`` (LS.py).

Deliberate difference: the reference does not wrap the temperature module in DDP, so under its
multi-process mode each process's temperature gets only its own gradient and they drift apart; the
adapter should average its gradient like every other trained parameter. ``LinearDecay`` (the
``--cosine_decay 0`` alternative, unused by the published command) is not ported.
"""
import math

import torch
import torch.nn as nn
from torch.autograd import Function

from helper.errors import UserError

from . import LS
from .LS import kd_loss
from .registry import Distiller, register

CE_WEIGHT = 0.1
KD_WEIGHT = 0.9
T_START = 1.0
T_END = 20.0
DECAY_MAX = 0.0
DECAY_MIN = -1.0
DECAY_LOOPS = 10


class Global_T(nn.Module):
    """One learnable scalar, returned through ``GradientReversal``; the two inputs are ignored (the
    reference's call passes the teacher's and student's logits)."""

    def __init__(self):
        super().__init__()
        self.global_T = nn.Parameter(torch.ones(1), requires_grad=True)
        self.grl = GradientReversal()

    def forward(self, fake_input1, fake_input2, lambda_):
        return self.grl(self.global_T, lambda_)


class GradientReversalFunction(Function):
    """Identity forward; backward multiplies the incoming gradient by ``lambda_`` (reversed when < 0)."""

    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads):
        # a Python scalar, not a new device tensor: copying one to a GPU would wait for the stream
        return grads * ctx.lambda_, None


class GradientReversal(nn.Module):
    def forward(self, x, lambda_):
        return GradientReversalFunction.apply(x, lambda_)


class CosineDecay:
    """``get_value(i)``: ``max_value`` at i <= 0 falling along a half cosine to ``min_value`` at
    i >= ``num_loops``."""

    def __init__(self, max_value, min_value, num_loops):
        self._max_value = max_value
        self._min_value = min_value
        self._num_loops = num_loops

    def get_value(self, i):
        i = min(max(i, 0), self._num_loops)
        value = (math.cos(i * math.pi / self._num_loops) + 1.0) * 0.5
        return value * (self._max_value - self._min_value) + self._min_value


def lambda_schedule(epoch):
    """The published run's lambda for a 1-based epoch."""
    return CosineDecay(DECAY_MAX, DECAY_MIN, DECAY_LOOPS).get_value(epoch)


def ctkd_temperature(global_t, t_start=T_START, t_end=T_END):
    """``t_start + t_end * sigmoid(Global_T's output)``."""
    return t_start + t_end * torch.sigmoid(global_t)


def ctkd_loss(logits_student, logits_teacher, temperature, logit_stand=False):
    """KD at the learned (tensor) temperature, as a 0-dim tensor (the reference's has shape ``[1]``)."""
    return kd_loss(logits_student, logits_teacher, temperature, logit_stand=logit_stand).reshape(())


@register('ctkd')
class CTKDDistiller(Distiller):
    """``--distill ctkd``: KD at the learned temperature ``t_start + t_end * sigmoid(Global_T)``.

    The temperature module is a parameter of the distiller, so it is trained by the run's SGD (the
    student's lr, momentum and weight decay, as the reference's ``trainable_list``), saved and resumed
    with it, and, unlike the reference, averaged across processes by DDP. ``on_epoch_start`` sets the
    gradient-reversal lambda from the cosine schedule (``--ctkd_decay_*``). The term replaces the ``-a``
    KL term at the fixed ``--kd_T``; the loop's CE is ``-r`` (0.1), the term's weight ``-b`` (0.9).
    With ``--logit_stand`` both logits are standardised first (LS's ``-r 0.1 -b 9``).

    The current temperature is ``temperature()``; it is not a logged loss term (the loop sums terms).
    """
    display_name = 'CTKD'
    source = 'zhengli97/CTKD models/temp_global.py, helper/loops.py, scripts/run_cifar_distill.sh'
    weights = {'gamma': CE_WEIGHT, 'alpha': 0, 'beta': KD_WEIGHT}
    ls_weights = {'gamma': LS.CTKD_CE_WEIGHT, 'alpha': 0, 'beta': LS.CTKD_KD_WEIGHT}
    replaces_kd = True

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument('--ctkd_t_start', type=float, default=T_START,
                            help='CTKD: temperature = t_start + t_end * sigmoid(learned)')
        parser.add_argument('--ctkd_t_end', type=float, default=T_END, help='CTKD: see --ctkd_t_start')
        parser.add_argument('--ctkd_decay_max', type=float, default=DECAY_MAX,
                            help='CTKD: gradient-reversal lambda at epoch 0 (cosine schedule)')
        parser.add_argument('--ctkd_decay_min', type=float, default=DECAY_MIN,
                            help='CTKD: lambda from epoch --ctkd_decay_loops on')
        parser.add_argument('--ctkd_decay_loops', type=int, default=DECAY_LOOPS,
                            help='CTKD: epochs of the cosine from --ctkd_decay_max to --ctkd_decay_min')
        LS.add_logit_stand_argument(parser)

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        if opt.ctkd_decay_loops < 1:
            raise UserError('--ctkd_decay_loops must be at least 1, got {}'.format(opt.ctkd_decay_loops))
        if opt.ctkd_t_start <= 0 or opt.ctkd_t_end < 0:
            raise UserError('CTKD needs --ctkd_t_start > 0 and --ctkd_t_end >= 0 (a positive temperature), got '
                            '{:g} and {:g}'.format(opt.ctkd_t_start, opt.ctkd_t_end))
        self.logit_stand = bool(getattr(opt, 'logit_stand', False))
        self.t_start, self.t_end = opt.ctkd_t_start, opt.ctkd_t_end
        self.schedule = CosineDecay(opt.ctkd_decay_max, opt.ctkd_decay_min, opt.ctkd_decay_loops)
        self.global_temperature = Global_T()
        self.on_epoch_start(1)

    def on_epoch_start(self, epoch):
        self.lambda_ = self.schedule.get_value(epoch)

    def temperature(self):
        """The temperature the next step uses (a tensor of shape ``[1]``, no gradient)."""
        with torch.no_grad():
            return ctkd_temperature(self.global_temperature.global_T, self.t_start, self.t_end)

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        temp = ctkd_temperature(self.global_temperature(logit_t, logit_s, self.lambda_), self.t_start, self.t_end)
        return ctkd_loss(logit_s, logit_t, temp, logit_stand=self.logit_stand)
