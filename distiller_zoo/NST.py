"""NST: Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", arXiv 2017.

Checked against HobbitLong/RepDistiller ``distiller_zoo/NST.py`` (the loss),
``train_student.py``, ``helper/loops.py`` and ``scripts/run_cifar_distill.sh``;
megvii-research/mdistiller ``mdistiller/engine/cfg.py`` gives the same weight (NST
FEAT_WEIGHT 50).

How RepDistiller trains NST (``--distill nst``): ``-r 1 -a 0 -b 50``, the loss summed
over the stage maps ``feat[1:-1]`` (after their ReLU), no extra module, no init stage.
"""
import torch.nn as nn
import torch.nn.functional as F

from .registry import Distiller, register

REFERENCE = dict(
    distill='nst',
    gamma=1.0, alpha=0.0, beta=50.0,  # scripts/run_cifar_distill.sh: -a 0 -b 50
    main_stage_loss=True,
    features=slice(1, -1),            # feat[1:-1], summed over the returned list
    preact=False,
    init_epochs=0,                    # no init stage
)


class NSTLoss(nn.Module):
    """Squared MMD with the polynomial kernel ``k(x, y) = (x . y)^2`` between the
    channels of two maps.

    Each channel's map over the positions is L2-normalised (one sample of the
    distribution); per pair of maps the loss is
    ``mean K(t, t) + mean K(s, s) - 2 mean K(s, t)``, the means over batch and channel
    pairs; the first term is detached (constant for the student). When heights differ the
    taller map is average-pooled to the shorter one's (square) size first.
    ``forward(g_s, g_t)`` returns one loss per pair (``zip``).

    The reference builds each kernel by broadcasting a ``(B, C, C, H*W)`` tensor; a batched
    matrix product gives the same kernel with far less memory. Its dead ``full_loss=False``
    branch (which drops the constant term) is left out.
    """

    def forward(self, g_s, g_t):
        return [self.nst_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def nst_loss(self, f_s, f_t):
        s_H, t_H = f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        f_s = F.normalize(f_s.flatten(2), dim=2)
        f_t = F.normalize(f_t.flatten(2), dim=2)
        return (self.poly_kernel(f_t, f_t).mean().detach() + self.poly_kernel(f_s, f_s).mean()
                - 2 * self.poly_kernel(f_s, f_t).mean())

    @staticmethod
    def poly_kernel(a, b):
        """``(B, C_b, C_a)`` squared dot products of the rows of ``b`` and ``a``."""
        return (b @ a.transpose(1, 2)).pow(2)


@register('nst')
class NSTDistiller(Distiller):
    """``--distill nst``: ``sum(NSTLoss()(feat_s[1:-1], feat_t[1:-1]))``, as RepDistiller."""
    display_name = 'NST'
    source = 'HobbitLong/RepDistiller distiller_zoo/NST.py'
    weights = {'gamma': REFERENCE['gamma'], 'alpha': REFERENCE['alpha'], 'beta': REFERENCE['beta']}

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        self.criterion = NSTLoss()

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        i = REFERENCE['features']
        return sum(self.criterion(feat_s[i], feat_t[i]))
