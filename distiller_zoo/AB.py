"""AB: Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by
Hidden Neurons", AAAI 2019.

Checked against HobbitLong/RepDistiller ``distiller_zoo/AB.py`` (the loss),
``models/util.py`` (``Connector``, here in ``models/util.py``), ``helper/pretrain.py`` (the
init stage), ``train_student.py``, ``helper/loops.py`` and ``scripts/run_cifar_distill.sh``.

How RepDistiller trains AB (``--distill abound``), the facts ``REFERENCE`` holds:

* features: the student's and teacher's stage maps ``feat[1:-1]`` *before* their ReLU
  (``preact=True``, in the init stage and, unused, in the main stage too: for a WRN student
  that still matters, since its ``preact`` forward runs three BN layers twice);
* init stage, ``--init_epochs 30``: SGD (momentum 0.9, weight decay 5e-4, the run's
  ``--learning_rate``, no decay) on ``Connector(s_shapes, t_shapes)`` and
  ``model_s.get_feat_modules()``; loss ``sum(ABLoss(len(feat_s[1:-1]))(connector(g_s),
  g_t))`` with margin 1.0 and per-layer weights ``2**(i - n + 1)`` (the last stage 1, the
  one before 1/2, ...). During it the student is in eval mode except its
  ``get_feat_modules()`` (train mode), the teacher in eval mode;
* main stage: ``-r 1 -a 0 -b 1``, but the AB term there is 0 (``loss_kd = 0``): the main
  stage is plain cross-entropy from the initialised student; the connector is kept in
  eval mode, untrained and unused.
"""
import torch.nn as nn

from helper.errors import UserError
from models.util import Connector, get_feat_modules

from .registry import Distiller, InitStage, register, zero_loss

REFERENCE = dict(
    distill='abound',
    gamma=1.0, alpha=0.0, beta=1.0,   # scripts/run_cifar_distill.sh: -a 0 -b 1
    main_stage_loss=False,            # helper/loops.py: loss_kd = 0 for abound, so -b multiplies nothing
    features=slice(1, -1),            # feat[1:-1], the stage maps
    preact=True,                      # init and main stage both call the models with preact=True
    margin=1.0,                       # ABLoss default, the value train_student.py uses
    init_epochs=30,                   # --init_epochs
    init_lr=None,                     # None: the run's --learning_rate (0.05; 0.01 for MobileNetV2/ShuffleV1/V2)
    init_momentum=0.9, init_weight_decay=5e-4,
    init_trains=('connector', 'model_s.get_feat_modules()'),
    init_student_mode='eval, except model_s.get_feat_modules() in train mode',
)


class ABLoss(nn.Module):
    """Activation-boundary loss between connected student maps and teacher maps.

    Both are pre-activation maps. Per pair, a neuron of the teacher that is on (``t > 0``)
    pulls the student's value up to at least ``margin``, one that is off (``t <= 0``)
    pushes it down to at most ``-margin``, by the squared hinge::

        l = sum((s + margin)^2 * [s > -margin and t <= 0] + (s - margin)^2 * [s <= margin and t > 0])

    ``forward(g_s, g_t)`` returns a list, one entry per pair (``zip``):
    ``w_i * l_i / B * 3 / 1000`` with ``w_i = 2**(i - feat_num + 1)`` and ``B`` the batch
    size. The weights and the ``3 / 1000`` scale are those of the authors' code too
    (bhheo/AB_distillation ``cifar10_AB_distillation.py``).

    The teacher map only enters through the masks, so no gradient reaches it.
    """

    def __init__(self, feat_num, margin=1.0):
        super().__init__()
        self.w = [2 ** (i - feat_num + 1) for i in range(feat_num)]
        self.margin = margin

    def forward(self, g_s, g_t):
        bsz = g_s[0].shape[0]
        losses = [self.criterion_alternative_l2(s, t) for s, t in zip(g_s, g_t)]
        # the reference's order of operations, for the same float rounding
        losses = [w * l for w, l in zip(self.w, losses)]
        losses = [l / bsz for l in losses]
        return [l / 1000 * 3 for l in losses]

    def criterion_alternative_l2(self, source, target):
        m = self.margin
        off = ((source > -m) & (target <= 0)).float()
        on = ((source <= m) & (target > 0)).float()
        return ((source + m) ** 2 * off + (source - m) ** 2 * on).sum()


def check_ab_pair(s_shapes, t_shapes):
    """Raise ``UserError`` (one line, before any training) when ``Connector`` cannot join
    the student's stage maps to the teacher's: unequal numbers of maps, or a student map
    smaller than the teacher's by other than half. RepDistiller fails on both too (an
    assertion, and a ConvReg it cannot build)."""
    if len(s_shapes) != len(t_shapes):
        raise UserError('--distill abound pairs the stage maps one to one, but the student has {} and the '
                        'teacher {}; choose models with as many stages'.format(len(s_shapes), len(t_shapes)))
    for i, (s, t) in enumerate(zip(s_shapes, t_shapes)):
        if s[2] < t[2] and 2 * s[2] != t[2]:
            raise UserError('--distill abound cannot connect stage map {}: the student map is {}x{}, the '
                            "teacher's {}x{} (the connector only upsamples by 2)".format(i + 1, s[2], s[3],
                                                                                        t[2], t[3]))


@register('abound')
class ABDistiller(Distiller):
    """``--distill abound``: RepDistiller's two-stage AB.

    Init stage (``--init_epochs``, the run's learning rate): ``sum(ABLoss(n)(connector(
    feat_s[1:-1]), feat_t[1:-1]))`` on pre-activation maps trains the ``Connector`` and the
    student's ``get_feat_modules()``. Main stage: no AB term (RepDistiller's ``loss_kd = 0``,
    so ``-b`` multiplies zero): cross-entropy from the initialised student. The connector
    is trained by the init stage only: frozen and in eval mode otherwise, as RepDistiller
    keeps it out of the optimiser and in eval mode.
    """
    display_name = 'AB'
    source = 'HobbitLong/RepDistiller distiller_zoo/AB.py, models/util.py, helper/pretrain.py'
    weights = {'gamma': REFERENCE['gamma'], 'alpha': REFERENCE['alpha'], 'beta': REFERENCE['beta']}
    preact = REFERENCE['preact']

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        s_shapes = [f.shape for f in feat_s[REFERENCE['features']]]
        t_shapes = [f.shape for f in feat_t[REFERENCE['features']]]
        check_ab_pair(s_shapes, t_shapes)
        # a plain list: the student's modules are the student's, not parameters of the distiller
        self._feat_modules = [get_feat_modules(model_s)]
        self.connector = Connector(s_shapes, t_shapes).requires_grad_(False)
        self.criterion = ABLoss(len(s_shapes), margin=REFERENCE['margin'])

    def train(self, mode=True):
        super().train(mode)
        self.connector.eval()  # the init stage sets it to train mode itself
        return self

    def init_stage(self, opt):
        return InitStage(opt.init_epochs, [self.connector, self._feat_modules[0]], lr=opt.learning_rate)

    def init_loss(self, feat_s, feat_t, logit_s, logit_t, batch):
        g_s = self.connector(feat_s[REFERENCE['features']])
        return sum(self.criterion(g_s, feat_t[REFERENCE['features']]))

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        return zero_loss(logit_s)
