"""OFD: Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019.

Checked against clovaai/overhaul-distillation ``CIFAR-100/distiller.py``
(``get_margin_from_BN``, ``build_feature_connector``, ``distillation_loss``) and
``CIFAR-100/train_with_distillation.py``, and megvii-research/mdistiller
``mdistiller/distillers/OFD.py`` (``feat_loss``, ``ConnectorConvBN``, the wiring),
``configs/cifar100/ofd.yaml`` and ``mdistiller/engine/cfg.py`` (the weights), whose
CIFAR-100 row the usual tables quote.

How mdistiller trains OFD on CIFAR-100, the facts ``REFERENCE`` holds:

* features: the stage maps *before* their ReLU, ``feat[1:-1]`` with ``preact=True``
  (mdistiller's ``preact_feats[1:]``); when the two lists differ in length both keep their
  last ``min`` maps (``_align_list``);
* margins: one per teacher channel, ``get_margin_from_BN`` of each BN that
  ``model_t.get_bn_before_relu()`` returns, computed once when the distiller is built
  (from the BN's weight and bias, the trained teacher's), shaped ``(1, C, 1, 1)``.
  mdistiller indexes them from the first stage even when it dropped leading teacher maps
  (a teacher with more stages than the student); no published pair has that, and the
  adapter keeps the margins of the kept maps;
* connectors: ``ConnectorConvBN(s_channels, t_channels, kernel_size=1)``, one 1x1
  convolution + BN per pair, trained with the student;
* loss: ``sum_i feat_loss(connector_i(f_s_i), adaptive_avg_pool2d(f_t_i, f_s_i's size)
  .detach(), margin_i) / 2**(n - 1 - i)`` (the last stage weighs 1, the one before 1/2, ...);
  ``-r 1 -a 0 -b 0.001`` (CE_WEIGHT 1, FEAT_WEIGHT 0.001, no KD term). The authors'
  script computes the same: its ``distillation_loss`` sums over the batch and
  ``train_with_distillation.py`` divides by the batch size and by 1000;
* the teacher runs in *train* mode (batch statistics in its BN layers): mdistiller's
  ``OFD.train()`` sets every child to train, teacher included, and the authors' script
  calls ``t_net.train()``; its features are computed without gradients;
* no init stage; mdistiller's CIFAR solver is the usual one (SGD 0.05, momentum 0.9,
  weight decay 5e-4, batch 64, 240 epochs, decay 0.1 at 150/180/210).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError

from .registry import Distiller, register

REFERENCE = dict(
    distill='ofd',
    gamma=1.0, alpha=0.0, beta=0.001,  # mdistiller cfg.py OFD.LOSS: CE_WEIGHT 1.0, FEAT_WEIGHT 0.001
    main_stage_loss=True,
    features=slice(1, -1),             # feat[1:-1] with preact=True; both lists keep their last min(len) maps
    preact=True,
    connector_kernel_size=1,           # mdistiller cfg.py OFD.CONNECTOR.KERNEL_SIZE
    layer_weights='1 / 2**(n - 1 - i)',
    pool_teacher_to_student=True,      # F.adaptive_avg_pool2d(f_t, f_s.shape[-2:]).detach()
    teacher_train_mode=True,           # mdistiller OFD.train() and the authors' t_net.train()
    init_epochs=0,                     # no init stage
)


def _normal_cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def get_margin_from_BN(bn):
    """The margin of each channel of BN layer ``bn`` (a 1-D float32 tensor on its device).

    A BN output before a ReLU is taken as ``N(m, s^2)`` with ``m = bias`` and
    ``s = |weight|``; the margin is the mean of its negative part,
    ``E[x | x < 0] = m - s * phi(m/s) / Phi(-m/s)``, or ``-3 s`` when
    ``Phi(-m/s) <= 0.001`` (almost never negative). The reference divides by zero when a
    weight is exactly 0; this returns the limit there, ``min(m, 0)``. ``Phi`` comes from
    ``math.erfc`` instead of the reference's scipy.
    """
    margin = []
    for s, m in zip(bn.weight.detach().tolist(), bn.bias.detach().tolist()):
        s = abs(s)
        if s == 0:
            margin.append(min(m, 0.0))
            continue
        cdf = _normal_cdf(-m / s)
        if cdf > 0.001:
            margin.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m)
        else:
            margin.append(-3 * s)
    return torch.tensor(margin, dtype=torch.float32, device=bn.weight.device)


def feat_loss(source, target, margin):
    """OFD's partial L2 distance, summed over channels and positions, averaged over the batch.

    ``source``: the connected student map; ``target``: the teacher's pre-ReLU map;
    ``margin``: ``(1, C, 1, 1)``. Where the teacher is positive the student must match it;
    where it is negative the student only has to stay below it, and below the margin
    once the teacher is below the margin::

        (s - m)^2 [s > m, t <= m] + (s - t)^2 [s > t, m < t <= 0] + (s - t)^2 [t > 0]

    which equals the authors' ``(s - max(t, m))^2 [s > max(t, m) or max(t, m) > 0]`` for
    the non-positive margins ``get_margin_from_BN`` gives. No detach: the caller passes
    the teacher map detached (mdistiller does).
    """
    margin = margin.to(source)
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
            + (source - target) ** 2 * (target > 0).float())
    return loss.mean(dim=0).sum()


def build_feature_connector(t_channel, s_channel, kernel_size=1):
    """A convolution from ``s_channel`` to ``t_channel`` channels (no bias, "same" padding)
    and a BN, initialised as the reference: He-normal weights with fan-out, BN 1 and 0.
    The authors' version is the ``kernel_size=1`` case."""
    conv = nn.Conv2d(s_channel, t_channel, kernel_size=kernel_size, stride=1,
                     padding=(kernel_size - 1) // 2, bias=False)
    bn = nn.BatchNorm2d(t_channel)
    nn.init.normal_(conv.weight, 0, math.sqrt(2. / (kernel_size * kernel_size * t_channel)))
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


class ConnectorConvBN(nn.Module):
    """One ``build_feature_connector`` per pair of ``s_channels``/``t_channels`` (mdistiller's
    module; state-dict keys ``connectors.<i>.0.weight``, ``connectors.<i>.1.*``).
    ``forward(g_s)`` maps each student map."""

    def __init__(self, s_channels, t_channels, kernel_size=1):
        super().__init__()
        if len(s_channels) != len(t_channels):
            raise ValueError('unequal length of feat list: {} vs {}'.format(len(s_channels), len(t_channels)))
        self.s_channels = s_channels
        self.t_channels = t_channels
        self.connectors = nn.ModuleList(build_feature_connector(t, s, kernel_size)
                                        for t, s in zip(t_channels, s_channels))

    def forward(self, g_s):
        return [connector(f) for connector, f in zip(self.connectors, g_s)]


def teacher_margins(model_t, t_channels):
    """``get_margin_from_BN`` of each BN layer that ``model_t.get_bn_before_relu()`` names,
    one per teacher stage map of ``t_channels`` channels; ``UserError`` for a teacher
    without them."""
    if not hasattr(model_t, 'get_bn_before_relu'):
        raise UserError('{} cannot be the teacher of --distill ofd: it names no BN layers before its ReLUs '
                        '(get_bn_before_relu) to take margins from; choose a CIFAR teacher'.format(type(model_t).__name__))
    bns = model_t.get_bn_before_relu()  # raises UserError itself where no reference has such a teacher
    channels = [bn.num_features for bn in bns]
    if channels != list(t_channels):
        raise UserError('--distill ofd needs one BN layer before a ReLU per teacher stage map, but {} names BN layers '
                        'of {} channels for maps of {}; choose another teacher'.format(type(model_t).__name__,
                                                                                      channels, list(t_channels)))
    return [get_margin_from_BN(bn) for bn in bns]


@register('ofd')
class OFDDistiller(Distiller):
    """``--distill ofd``: mdistiller's OFD on the stage maps before their ReLU.

    ``sum_i feat_loss(connector_i(g_s[i]), adaptive_avg_pool2d(g_t[i], g_s[i]'s size),
    margin_i) / 2**(n - 1 - i)`` over the last ``n = min`` stage maps of both networks
    (``feat[1:-1]`` with ``preact``). The margins come from the BN layers of the teacher
    passed in (the original module, not a BN-folded copy), computed once here as both
    references do; they are not saved in checkpoints, since the teacher gives them again.

    Kept reference quirk (``teacher_train_mode``): mdistiller's ``OFD.train()`` and the
    authors' ``t_net.train()`` run the frozen teacher in train mode, so its BN layers
    normalise each batch with the batch's own statistics (and update running statistics
    that nothing reads: only the student is evaluated, and the margins come from the BN
    weights and biases). The published CIFAR-100 numbers were trained against those
    teacher features, so the default keeps them.
    """
    display_name = 'OFD'
    source = ('megvii-research/mdistiller mdistiller/distillers/OFD.py, configs/cifar100/ofd.yaml; '
              'clovaai/overhaul-distillation CIFAR-100/distiller.py')
    weights = {'gamma': REFERENCE['gamma'], 'alpha': REFERENCE['alpha'], 'beta': REFERENCE['beta']}
    preact = REFERENCE['preact']
    teacher_train_mode = REFERENCE['teacher_train_mode']

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        if model_t is None:
            raise ValueError('--distill ofd needs the teacher (model_t) for its margins')
        i = REFERENCE['features']
        g_s, g_t = feat_s[i], feat_t[i]
        margins = teacher_margins(model_t, [f.shape[1] for f in g_t])
        # both lists keep their last n maps (mdistiller's _align_list), the margins those of the kept teacher maps
        self.n = min(len(g_s), len(g_t))
        self.connectors = ConnectorConvBN([f.shape[1] for f in g_s[-self.n:]], [f.shape[1] for f in g_t[-self.n:]],
                                          kernel_size=REFERENCE['connector_kernel_size'])
        for k, margin in enumerate(margins[-self.n:]):
            self.register_buffer('margin{}'.format(k + 1), margin.reshape(1, -1, 1, 1), persistent=False)

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        i, n = REFERENCE['features'], self.n
        g_s = self.connectors(feat_s[i][-n:])
        g_t = feat_t[i][-n:]
        loss = 0
        for k, (s, t) in enumerate(zip(g_s, g_t)):
            t = F.adaptive_avg_pool2d(t, s.shape[-2:]).detach()
            loss = loss + feat_loss(s, t, getattr(self, 'margin{}'.format(k + 1))) / 2 ** (n - k - 1)
        return loss
