"""KD: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015."""
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError

from . import LS
from .registry import Distiller, register, zero_loss


class DistillKL(nn.Module):
    """KL divergence between temperature-softened teacher and student predictions.

    ``forward(y_s, y_t)`` takes logits of shape ``(batch, classes)`` and returns
    ``T^2 * sum_i KL(softmax(y_t_i / T) || softmax(y_s_i / T)) / batch``: summed over
    classes, averaged over the batch. The ``T^2`` keeps the gradient's scale independent
    of ``T``, as the paper recommends. The teacher's logits are not detached here; the
    training loop computes them without gradient.
    """

    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, y_s, y_t):
        log_p_s = F.log_softmax(y_s / self.T, dim=1)
        log_p_t = F.log_softmax(y_t / self.T, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * self.T ** 2


@register('kd')
class KDDistiller(Distiller):
    """``--distill kd``: no extra term; with ``--logit_stand``, KD on standardised logits.

    KD itself is the ``-a`` term, which the loop computes with ``DistillKL(opt.kd_T)`` for
    every method; this adapter only contributes a zero ``-b`` term.

    With ``--logit_stand`` (LS.py) the adapter computes LS's ``kd_loss(..., --kd_T,
    logit_stand=True)`` itself as its ``-b`` term and the loop drops its own KL term: the
    switch sets ``replaces_kd`` on the instance. LS's reference runs are ``ls_weights`` (and
    ``ls_pair_weights`` per pair, with the ``--kd_T`` each ran).
    """
    display_name = 'KD'
    source = 'HobbitLong/RepDistiller distiller_zoo/KD.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 0}
    ls_weights = {'gamma': LS.KD_CE_WEIGHT, 'alpha': 0, 'beta': LS.KD_WEIGHT, 'kd_T': LS.BASE_TEMP}
    ls_pair_weights = {pair: {'gamma': LS.KD_CE_WEIGHT, 'alpha': 0, 'beta': weight, 'kd_T': temp}
                       for pair, (temp, weight) in LS.KD_PAIRS.items()}

    @classmethod
    def add_arguments(cls, parser):
        LS.add_logit_stand_argument(parser)

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        self.logit_stand = bool(getattr(opt, 'logit_stand', False))
        self.T = opt.kd_T
        if self.logit_stand:
            if opt.beta == 0:
                raise UserError('kd --logit_stand computes the KD term as the -b term (the -a KL term is dropped), '
                                'so -b 0 would train on cross-entropy alone; LS\'s reference: -r {:g} -b {:g} '
                                '--kd_T {:g}'.format(LS.KD_CE_WEIGHT, LS.KD_WEIGHT, LS.BASE_TEMP))
            self.replaces_kd = True

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        if self.logit_stand:
            return LS.kd_loss(logit_s, logit_t, self.T, logit_stand=True)
        return zero_loss(logit_s)
