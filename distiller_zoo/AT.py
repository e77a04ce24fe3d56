"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance
of Convolutional Neural Networks via Attention Transfer", ICLR 2017."""
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError

from .registry import Distiller, register


class Attention(nn.Module):
    """Attention transfer between pairs of feature maps.

    ``forward(g_s, g_t)`` takes two lists of ``(B, C, H, W)`` maps, pairs them by position
    (``zip``: extra maps on the longer side are ignored) and returns a list with one loss
    per pair. A map's attention is ``mean_c(f^p)``, flattened and L2-normalised per sample;
    the pair loss is the mean over batch and positions of the squared difference of the
    two attentions. When the heights differ the taller map is average-pooled to the
    shorter one's (square) size first.

    Differences from the paper, kept from the reference (the authors' code does the
    same): the paper sums ``|f|^p`` over channels (the mean gives the same map once
    normalised) and penalises the p-norm of the difference, ``beta/2 * ||q_s - q_t||_p``
    per sample, not the mean squared difference; it also needs equal spatial sizes, where
    the reference pools.
    """

    def __init__(self, p=2):
        super().__init__()
        self.p = p

    def forward(self, g_s, g_t):
        return [self.at_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def at_loss(self, f_s, f_t):
        s_H, t_H = f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        return (self.at(f_s) - self.at(f_t)).pow(2).mean()

    def at(self, f):
        """The normalised attention vector of each sample, shape ``(B, H*W)``."""
        return F.normalize(f.pow(self.p).mean(1).reshape(f.shape[0], -1), dim=1)


def stage_pairs(feat_s, feat_t):
    """How many stage maps ``feat[1:-1]`` the student and teacher share (``zip`` pairs)."""
    return min(len(feat_s), len(feat_t)) - 2


@register('attention')
class ATDistiller(Distiller):
    """``--distill attention``: ``Attention(p=2)`` summed over the stage pairs
    ``zip(feat_s[1:-1], feat_t[1:-1])``."""
    display_name = 'AT'
    source = 'HobbitLong/RepDistiller distiller_zoo/AT.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 1000}

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        if stage_pairs(feat_s, feat_t) < 1:
            raise UserError('--distill attention needs models with at least one stage feature map '
                            '(feature lists of length >= 3); choose other models or another method')
        self.criterion = Attention(p=2)

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        g_t = [f.detach() for f in feat_t[1:-1]]
        return sum(self.criterion(feat_s[1:-1], g_t))
