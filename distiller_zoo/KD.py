"""KD: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015."""
import torch.nn as nn
import torch.nn.functional as F

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
    """``--distill kd``: no extra term.

    KD itself is the ``-a`` term, which the loop computes with ``DistillKL(opt.kd_T)`` for
    every method; this adapter only contributes a zero ``-b`` term.
    """
    display_name = 'KD'
    source = 'HobbitLong/RepDistiller distiller_zoo/KD.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 0}

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        return zero_loss(logit_s)
