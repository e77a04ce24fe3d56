"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019."""
import torch.nn as nn
import torch.nn.functional as F

from .registry import Distiller, register


class Similarity(nn.Module):
    """Match the batch's pairwise-similarity (Gram) matrices of student and teacher.

    ``forward(g_s, g_t)`` takes two lists of features (any shape ``(B, ...)``), pairs them
    by position and returns a list with one loss per pair: each feature is flattened per
    sample, ``G = f f^T`` is row-normalised (L2), and the loss is
    ``||G_t - G_s||_F^2 / B^2``. This is the paper's formula. The reference returns each
    loss as a one-element tensor of shape ``[1]``; ours are 0-dim, with the same value.
    """

    def forward(self, g_s, g_t):
        return [self.similarity_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def similarity_loss(self, f_s, f_t):
        bsz = f_s.shape[0]
        G_s = self.gram(f_s)
        G_t = self.gram(f_t)
        return (G_t - G_s).pow(2).sum() / (bsz * bsz)

    @staticmethod
    def gram(f):
        """The row-normalised ``(B, B)`` similarity matrix of a batch of features."""
        f = f.reshape(f.shape[0], -1)
        return F.normalize(f @ f.t(), dim=1)


@register('similarity')
class SPDistiller(Distiller):
    """``--distill similarity``: ``Similarity`` on the last feature map, ``feat[-2]``."""
    display_name = 'SP'
    source = 'HobbitLong/RepDistiller distiller_zoo/SP.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 3000}

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        self.criterion = Similarity()

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        return sum(self.criterion([feat_s[-2]], [feat_t[-2].detach()]))
