"""FSP: Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning", CVPR 2017.

Checked against HobbitLong/RepDistiller ``distiller_zoo/FSP.py`` (the loss and its shape
check), ``helper/pretrain.py`` (the init stage), ``train_student.py``, ``helper/loops.py``,
``scripts/run_cifar_distill.sh`` and the README table.

How RepDistiller trains FSP (``--distill fsp``), the facts ``REFERENCE`` holds:

* features: ``feat[:-1]``, the stem map and every stage map (no pooled vector), after their
  ReLU (no preact); consecutive maps of one network give one FSP matrix each;
* the pair needs as many maps on both sides and equal channel counts map by map (the FSP
  matrices are ``C_(i+1) x C_i``); spatial sizes need not match (each network pools its
  own pair). That is why the README table has N/A for wrn_40_2 -> wrn_40_1 (32/64/128
  against 16/32/64 channels) and no FSP row for the cross-architecture pairs;
  ``check_fsp_pair`` refuses such pairs in one line;
* init stage, ``--init_epochs 30``: SGD (momentum 0.9, weight decay 5e-4, the run's
  ``--learning_rate``, no decay) on ``model_s.get_feat_modules()`` with
  ``sum(FSP(s_shapes, t_shapes)(feat_s[:-1], feat_t[:-1]))``; the student in eval mode
  except those modules, the teacher in eval mode;
* main stage: ``-r 1 -a 0 -b 50``, but the FSP term there is 0 (``loss_kd = 0``): the main
  stage is plain cross-entropy from the initialised student.
"""
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError
from models.util import get_feat_modules

from .registry import Distiller, InitStage, register, zero_loss

REFERENCE = dict(
    distill='fsp',
    gamma=1.0, alpha=0.0, beta=50.0,  # scripts/run_cifar_distill.sh: -a 0 -b 50
    main_stage_loss=False,            # helper/loops.py: loss_kd = 0 for fsp, so -b multiplies nothing
    features=slice(None, -1),         # feat[:-1], stem and stage maps
    preact=False,
    init_epochs=30,                   # --init_epochs
    init_lr=None,                     # None: the run's --learning_rate (0.05; 0.01 for MobileNetV2/ShuffleV1/V2)
    init_momentum=0.9, init_weight_decay=5e-4,
    init_trains=('model_s.get_feat_modules()',),
    init_student_mode='eval, except model_s.get_feat_modules() in train mode',
)


def check_fsp_pair(s_shapes, t_shapes):
    """Raise ``UserError`` in one line unless FSP can compare the two feature lists:
    as many maps on both sides and the same channel count at every position."""
    if len(s_shapes) != len(t_shapes):
        raise UserError('--distill fsp compares the feature maps one to one, but the student has {} and the '
                        'teacher {}; choose models with as many stages'.format(len(s_shapes), len(t_shapes)))
    for i, (s, t) in enumerate(zip(s_shapes, t_shapes)):
        if s[1] != t[1]:
            raise UserError('--distill fsp needs equal channel counts at every feature map, but map {} has {} '
                            "channels in the student and {} in the teacher (RepDistiller's table: N/A for "
                            'wrn_40_2 -> wrn_40_1); choose another pair or method'.format(i, s[1], t[1]))


class FSP(nn.Module):
    """Flow-of-solution-procedure matrices of consecutive maps, matched between networks.

    For maps ``bot = g[i]`` and ``top = g[i+1]`` of one network (the taller one
    average-pooled to the other's size), ``G[b, c, d] = mean_p top[b, c, p] * bot[b, d, p]``
    over the positions ``p``. ``forward(g_s, g_t)`` returns one loss per consecutive pair,
    ``mean((G_s - G_t)^2)``.

    The construction checks the shapes (``check_fsp_pair``; the reference raises a bare
    ``ValueError``). The reference builds the products by broadcasting a
    ``(B, C, C, H*W)`` tensor; a batched matrix product gives the same matrices with far
    less memory. The paper divides by ``H*W`` too but sums the squared differences over
    the matrix entries; the reference averages them, so ``-b`` absorbs the scale.
    """

    def __init__(self, s_shapes, t_shapes):
        super().__init__()
        check_fsp_pair(s_shapes, t_shapes)

    def forward(self, g_s, g_t):
        s_fsp = self.compute_fsp(g_s)
        t_fsp = self.compute_fsp(g_t)
        return [self.compute_loss(s, t) for s, t in zip(s_fsp, t_fsp)]

    @staticmethod
    def compute_loss(s, t):
        return (s - t).pow(2).mean()

    @staticmethod
    def compute_fsp(g):
        fsp_list = []
        for bot, top in zip(g[:-1], g[1:]):
            b_H, t_H = bot.shape[2], top.shape[2]
            if b_H > t_H:
                bot = F.adaptive_avg_pool2d(bot, (t_H, t_H))
            elif b_H < t_H:
                top = F.adaptive_avg_pool2d(top, (b_H, b_H))
            bot = bot.flatten(2)
            top = top.flatten(2)
            fsp_list.append(top @ bot.transpose(1, 2) / bot.shape[2])
        return fsp_list


@register('fsp')
class FSPDistiller(Distiller):
    """``--distill fsp``: RepDistiller's two-stage FSP.

    Init stage (``--init_epochs``, the run's learning rate): ``sum(FSP(feat_s[:-1],
    feat_t[:-1]))`` trains the student's ``get_feat_modules()``. Main stage: no FSP term
    (RepDistiller's ``loss_kd = 0``, so ``-b`` multiplies zero): cross-entropy from the
    initialised student. A pair FSP cannot compare is refused when the method is built
    (``check_fsp_pair``).
    """
    display_name = 'FSP'
    source = 'HobbitLong/RepDistiller distiller_zoo/FSP.py, helper/pretrain.py'
    weights = {'gamma': REFERENCE['gamma'], 'alpha': REFERENCE['alpha'], 'beta': REFERENCE['beta']}

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        i = REFERENCE['features']
        self.criterion = FSP([f.shape for f in feat_s[i]], [f.shape for f in feat_t[i]])
        # a plain list: the student's modules are the student's, not parameters of the distiller
        self._feat_modules = [get_feat_modules(model_s)]

    def init_stage(self, opt):
        return InitStage(opt.init_epochs, [self._feat_modules[0]], lr=opt.learning_rate)

    def init_loss(self, feat_s, feat_t, logit_s, logit_t, batch):
        i = REFERENCE['features']
        return sum(self.criterion(feat_s[i], feat_t[i]))

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        return zero_loss(logit_s)
