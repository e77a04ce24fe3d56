"""HKD: Passalis et al., "Heterogeneous Knowledge Distillation using Information Flow Modeling", CVPR 2020.

The kernels and divergence follow the authors' code (github.com/passalis/pkth) in the
"combined" setting that RepDistiller/SemCKD use: a cosine kernel and a Student's t kernel,
each turned into per-sample conditional probabilities, compared with Jeffreys' divergence.
"""
import torch
import torch.nn as nn

from .registry import Distiller, register


def pairwise_distances(a, eps=1e-6):
    """``sqrt(max(||a_i - a_j||^2, 0) + eps)`` for every pair of rows of ``a``.

    Computed as ``|a_i|^2 + |a_j|^2 - 2 a_i.a_j``, as in the reference: on the diagonal the
    exact value is ``sqrt(eps)``, but for large float32 feature maps the cancellation error
    exceeds ``eps`` (kept: the published numbers were trained with it).
    """
    sq = a.pow(2).sum(dim=1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (a @ a.t())
    return torch.sqrt(d2.clamp(min=0) + eps)


def cosine_pairwise_similarities(features, eps=1e-6, normalized=True):
    """Cosine similarity of every pair of rows, mapped from [-1, 1] to [0, 1] when ``normalized``."""
    features = features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    features = torch.where(torch.isnan(features), torch.zeros_like(features), features)
    similarities = features @ features.t()
    if normalized:
        similarities = (similarities + 1.0) / 2.0
    return similarities


def _row_probabilities(kernel):
    return kernel / kernel.sum(dim=1, keepdim=True)


def _jeffreys(p, q):
    return ((p - q) * (torch.log(p) - torch.log(q))).mean()


def combined_prob_loss(teacher_features, student_features):
    """Jeffreys divergence between teacher and student affinities, cosine kernel plus
    Student's t kernel ``1 / (1 + d)`` (the authors' ``prob_loss`` with all three settings
    ``'combined'``). Features are ``(B, D)``."""
    loss = 0
    for kernel in (cosine_pairwise_similarities, lambda f: 1.0 / (1 + pairwise_distances(f))):
        p_t = _row_probabilities(kernel(teacher_features))
        p_s = _row_probabilities(kernel(student_features))
        loss = loss + _jeffreys(p_t, p_s)
    return loss


class HKDLoss(nn.Module):
    """HKD's loss over a list of layer pairs (``f_s``, ``f_t``: lists of ``(B, ...)`` tensors,
    zipped, so the shorter list decides how many layers are used).

    Reference behaviour (the default; SemCKD's published HKD numbers come from it): the first
    layer's term is multiplied by ``init_weight`` and every later layer's term by 1. ``decay``
    has no effect there: the reference computes a decayed weight but never applies it.
    ``paper_weights=True`` applies it, as the paper describes: layer ``i`` (from 0) is weighted
    ``init_weight * decay ** i``.
    """

    def __init__(self, init_weight=100, decay=0.7, paper_weights=False):
        super(HKDLoss, self).__init__()
        self.init_weight = init_weight
        self.decay = decay
        self.paper_weights = paper_weights

    def forward(self, f_s, f_t):
        loss = 0
        for i, (student, teacher) in enumerate(zip(f_s, f_t)):
            term = combined_prob_loss(teacher.reshape(teacher.shape[0], -1), student.reshape(student.shape[0], -1))
            if self.paper_weights:
                weight = self.init_weight * self.decay ** i
            else:
                weight = self.init_weight if i == 0 else 1
            loss = loss + weight * term
        return loss


@register('hkd')
class HKDDistiller(Distiller):
    """``--distill hkd``: ``HKDLoss(--hkd_initial_weight, --hkd_decay)`` on the stage maps
    ``feat_s[1:-1]``/``feat_t[1:-1]``, paired in order (the shorter list decides how many).

    By default only the first stage is weighted (by ``--hkd_initial_weight``) and
    ``--hkd_decay`` is unused, as in the reference; ``--hkd_paper_weights`` weights stage ``i``
    by ``hkd_initial_weight * hkd_decay ** i`` as in the paper.

    The paper's two-pass recipe (PKT into ``resnet8x4_double``, then HKD from that network
    into ``resnet8x4``) is two runs of ``train_student.py``; this class is the second run's loss.
    """
    display_name = 'HKD'
    source = 'DefangChen/SemCKD distiller_zoo/HKD.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 1}

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument('--hkd_initial_weight', default=100, type=float, help='HKD: weight of the first layer')
        parser.add_argument('--hkd_decay', default=0.7, type=float, help='HKD: layer weight decay')
        parser.add_argument('--hkd_paper_weights', action='store_true',
                            help='HKD: weight stage i by hkd_initial_weight * hkd_decay**i (paper) instead of '
                                 'weighting only the first stage (reference, default)')

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        self.criterion = HKDLoss(init_weight=opt.hkd_initial_weight, decay=opt.hkd_decay,
                                 paper_weights=getattr(opt, 'hkd_paper_weights', False))

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        return self.criterion(feat_s[1:-1], [f.detach() for f in feat_t[1:-1]])
