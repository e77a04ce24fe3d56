"""FT: Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer",
NeurIPS 2018.

Checked against HobbitLong/RepDistiller ``distiller_zoo/FT.py`` (the loss),
``models/util.py`` (``Paraphraser``, ``Translator``, here in ``models/util.py``),
``helper/pretrain.py`` (the init stage), ``train_student.py``, ``helper/loops.py`` and
``scripts/run_cifar_distill.sh``.

How RepDistiller trains FT (``--distill factor``), the facts ``REFERENCE`` holds:

* features: the last stage map ``feat[-2]`` of both networks, after its ReLU (no preact);
* init stage, ``--init_epochs 30``: only ``Paraphraser(t_shape)`` (k=0.5, no BN) trains,
  to reconstruct the teacher map: ``nn.MSELoss()(paraphraser(f_t)[1], f_t)``. SGD with
  momentum 0.9 and weight decay 5e-4 at lr 0.01 when the *student* is one of
  ``FT_LR_STUDENTS`` (the CIFAR ResNets and WRNs), else the run's ``--learning_rate``
  (0.05; 0.01 for MobileNetV2/ShuffleV1/V2); no decay within the stage (``init_lr``);
* main stage: ``-r 1 -a 0 -b 200``; the loss is ``FactorTransfer()(translator(feat_s[-2]),
  paraphraser(feat_t[-2], is_factor=True))``. ``Translator(s_shape, t_shape)`` (k=0.5,
  with BN) trains with the student; the paraphraser stays in eval mode and out of the
  optimiser (the reference lets gradients reach its weights without ever applying them,
  so computing the teacher factor without gradients gives the same training).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.util import Paraphraser, Translator

from .registry import Distiller, InitStage, register

# helper/pretrain.py: students whose paraphraser is trained at lr 0.01 in the init stage
FT_LR_STUDENTS = ('resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110',
                  'resnet8x4', 'resnet32x4', 'wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2')

REFERENCE = dict(
    distill='factor',
    gamma=1.0, alpha=0.0, beta=200.0,  # scripts/run_cifar_distill.sh: -a 0 -b 200
    main_stage_loss=True,
    features=-2,                       # feat[-2], the last stage map
    preact=False,
    p1=2, p2=1,                        # FactorTransfer defaults, used as is
    k=0.5,                             # Paraphraser/Translator factor rate
    paraphraser_use_bn=False, translator_use_bn=True,
    init_epochs=30,                    # --init_epochs
    init_lr=0.01,                      # for FT_LR_STUDENTS; other students: the run's --learning_rate
    init_momentum=0.9, init_weight_decay=5e-4,
    init_trains=('paraphraser',),
    init_loss='nn.MSELoss()(paraphraser(f_t)[1], f_t)',
    main_trains=('translator',),       # the paraphraser is frozen (eval, not optimised) after the init stage
)


def init_learning_rate(model_s, learning_rate):
    """The init stage's lr for student ``model_s`` (helper/pretrain.py's rule)."""
    return 0.01 if model_s in FT_LR_STUDENTS else learning_rate


class FactorTransfer(nn.Module):
    """Distance between the student's and the teacher's normalised factors.

    A factor map ``f`` (``(B, C, H, W)``) becomes ``normalize(mean_c(f^p1))``, flattened per
    sample and L2-normalised; the loss is ``mean(|F_s - F_t|)`` when ``p2 == 1``, else
    ``mean((F_s - F_t)^p2)``, over batch and positions. When heights differ the taller
    map is average-pooled to the shorter one's (square) size first (the reference's rule).

    Kept from RepDistiller, which the published CIFAR table comes from: the authors'
    code (Jangho-Kim/Factor-Transfer-pytorch ``utils.FT``, ``train_student.py``)
    L2-normalises the whole flattened factor and takes ``nn.L1Loss`` of the difference;
    RepDistiller first reduces the factor to one value per position, ``mean_c(f^p1)``
    (AT's reduction). The reference returns one tensor here (not a list).
    """

    def __init__(self, p1=2, p2=1):
        super().__init__()
        self.p1 = p1
        self.p2 = p2

    def forward(self, f_s, f_t):
        return self.factor_loss(f_s, f_t)

    def factor_loss(self, f_s, f_t):
        s_H, t_H = f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        diff = self.factor(f_s) - self.factor(f_t)
        if self.p2 == 1:
            return diff.abs().mean()
        return diff.pow(self.p2).mean()

    def factor(self, f):
        return F.normalize(f.pow(self.p1).mean(1).reshape(f.shape[0], -1))


@register('factor')
class FTDistiller(Distiller):
    """``--distill factor``: RepDistiller's two-stage FT.

    Init stage (``--init_epochs``; lr 0.01 for ``FT_LR_STUDENTS``, else the run's): the
    ``Paraphraser`` learns to reconstruct the teacher's last stage map,
    ``MSE(paraphraser(f_t)[1], f_t)``; nothing else trains. Main stage:
    ``FactorTransfer()(translator(feat_s[-2]), paraphraser(feat_t[-2], is_factor=True))``
    with the ``Translator`` trained with the student. After the stage the paraphraser is
    frozen and in eval mode (RepDistiller keeps it out of the optimiser, in eval mode); its
    factor is computed without a graph, since the reference's gradients into it are never
    applied.
    """
    display_name = 'FT'
    source = 'HobbitLong/RepDistiller distiller_zoo/FT.py, models/util.py, helper/pretrain.py'
    weights = {'gamma': REFERENCE['gamma'], 'alpha': REFERENCE['alpha'], 'beta': REFERENCE['beta']}

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        i, k = REFERENCE['features'], REFERENCE['k']
        s_shape, t_shape = feat_s[i].shape, feat_t[i].shape
        self.paraphraser = Paraphraser(t_shape, k=k, use_bn=REFERENCE['paraphraser_use_bn']).requires_grad_(False)
        self.translator = Translator(s_shape, t_shape, k=k, use_bn=REFERENCE['translator_use_bn'])
        self.criterion = FactorTransfer(p1=REFERENCE['p1'], p2=REFERENCE['p2'])
        self.criterion_init = nn.MSELoss()

    def train(self, mode=True):
        super().train(mode)
        self.paraphraser.eval()  # the init stage sets it to train mode itself
        return self

    def init_stage(self, opt):
        return InitStage(opt.init_epochs, [self.paraphraser], lr=init_learning_rate(opt.model_s, opt.learning_rate))

    def init_loss(self, feat_s, feat_t, logit_s, logit_t, batch):
        f_t = feat_t[REFERENCE['features']]
        _, f_t_rec = self.paraphraser(f_t)
        return self.criterion_init(f_t_rec, f_t)

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        i = REFERENCE['features']
        with torch.no_grad():
            factor_t = self.paraphraser(feat_t[i], is_factor=True)
        return self.criterion(self.translator(feat_s[i]), factor_t)
