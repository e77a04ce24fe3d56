"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer", ECCV 2018."""
import torch
import torch.nn as nn

from .registry import Distiller, register


class PKT(nn.Module):
    """Match the conditional probability distributions that a cosine kernel induces on a batch.

    ``forward(f_s, f_t)`` takes two ``(B, D)`` batches. Each row is L2-normalised (norm
    plus ``1e-7``; NaNs, which only NaN inputs produce, become 0), the cosine similarities
    ``c`` are mapped to ``k = (c + 1) / 2``, each row of ``k`` is divided by its sum, and the
    loss is ``mean_{i,j} p_t[i,j] * log((p_t[i,j] + eps) / (p_s[i,j] + eps))`` over all
    ``B^2`` entries (``eps = 1e-7``).

    As in the authors' code, the sample itself (``j = i``) is part of each row's
    distribution and of the average; the paper excludes it and sums instead of averaging
    (``-b`` absorbs the scale).
    """

    def forward(self, f_s, f_t):
        return self.cosine_similarity_loss(f_s, f_t)

    @staticmethod
    def cosine_similarity_loss(output_net, target_net, eps=0.0000001):
        p_s = PKT._row_distributions(output_net, eps)
        p_t = PKT._row_distributions(target_net, eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()

    @staticmethod
    def _row_distributions(x, eps):
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        kernel = (x @ x.t() + 1.0) / 2.0
        return kernel / kernel.sum(1, keepdim=True)


@register('pkt')
class PKTDistiller(Distiller):
    """``--distill pkt``: ``PKT`` on the embeddings ``feat[-1]`` (flattened per sample)."""
    display_name = 'PKT'
    source = 'HobbitLong/RepDistiller distiller_zoo/PKT.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 30000}

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        self.criterion = PKT()

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        f_s = feat_s[-1].reshape(feat_s[-1].shape[0], -1)
        f_t = feat_t[-1].detach().reshape(feat_t[-1].shape[0], -1)
        return self.criterion(f_s, f_t)
