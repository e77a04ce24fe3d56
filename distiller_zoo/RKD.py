"""RKD: Park et al., "Relational Knowledge Distillation", CVPR 2019."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Distiller, register, zero_loss


class RKDLoss(nn.Module):
    """Distance-wise plus angle-wise relational loss, ``w_d * loss_d + w_a * loss_a``.

    ``forward(f_s, f_t)`` flattens both batches to ``(B, D)``.

    * ``loss_d``: the ``B x B`` Euclidean distance matrices, each divided by the mean of its
      positive entries, compared with the Huber loss (``smooth_l1``, threshold 1) averaged
      over all ``B^2`` entries.
    * ``loss_a``: for every triplet ``(a, b, c)`` the cosine of the angle at ``a`` between
      ``b - a`` and ``c - a`` (zero when either vector is zero), compared with the Huber
      loss averaged over all ``B^3`` triplets.

    The teacher side is computed without gradient. As in the authors' code, the averages
    run over all entries, the diagonal and degenerate triplets included (their terms are
    zero in both networks), where the paper's sums run over distinct pairs and triplets
    only; the weights 25 and 50 are the paper's. Distances come from
    ``|x|^2 + |y|^2 - 2 x.y`` clamped at ``1e-12``, as in the reference.
    """

    def __init__(self, w_d=25, w_a=50):
        super().__init__()
        self.w_d = w_d
        self.w_a = w_a

    def forward(self, f_s, f_t):
        student = f_s.reshape(f_s.shape[0], -1)
        teacher = f_t.reshape(f_t.shape[0], -1)

        with torch.no_grad():
            t_d = self.pdist(teacher)
            t_d = t_d / self.positive_mean(t_d)
            t_angle = self.angles(teacher)
        d = self.pdist(student)
        d = d / self.positive_mean(d)
        loss_d = F.smooth_l1_loss(d, t_d)
        loss_a = F.smooth_l1_loss(self.angles(student), t_angle)
        return self.w_d * loss_d + self.w_a * loss_a

    @staticmethod
    def positive_mean(d):
        """The reference's ``d[d > 0].mean()`` as a masked sum over a count: boolean indexing waits
        for the device to learn the result's size, this does not."""
        positive = d > 0
        return torch.where(positive, d, torch.zeros_like(d)).sum() / positive.sum()

    @staticmethod
    def pdist(e, squared=False, eps=1e-12):
        """``(B, B)`` pairwise (squared if ``squared``) distances of the rows of ``e``; zero diagonal."""
        sq_norm = e.pow(2).sum(1)
        d = (sq_norm.unsqueeze(1) + sq_norm.unsqueeze(0) - 2 * (e @ e.t())).clamp(min=eps)
        if not squared:
            d = d.sqrt()
        diagonal = torch.eye(len(e), dtype=torch.bool, device=e.device)
        return d.masked_fill(diagonal, 0)

    @staticmethod
    def angles(e):
        """Cosines of all ``B^3`` angles, flattened; entry ``(a, b, c)`` is the angle at ``a``."""
        # unit[a, b] is the unit vector from e[a] to e[b]
        unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


@register('rkd')
class RKDDistiller(Distiller):
    """``--distill rkd``: ``RKDLoss(w_d=25, w_a=50)`` on the embeddings ``feat[-1]``.

    A batch of one sample has no pairs and contributes zero (the reference gives NaN).
    """
    display_name = 'RKD'
    source = 'HobbitLong/RepDistiller distiller_zoo/RKD.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 1}

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        self.criterion = RKDLoss(w_d=25, w_a=50)

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        if feat_s[-1].shape[0] < 2:
            return zero_loss(logit_s)
        return self.criterion(feat_s[-1], feat_t[-1].detach())
