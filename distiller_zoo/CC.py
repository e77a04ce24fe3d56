"""CC: Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019."""
import torch.nn as nn

from helper.errors import UserError
from models.util import LinearEmbed

from .registry import Distiller, register, shared_argument, zero_loss


class Correlation(nn.Module):
    """The reference's correlation-congruence loss on two ``(B, D)`` embeddings.

    ``forward(f_s, f_t)``: with ``delta = |f_s - f_t|`` (per sample and dimension), returns
    the mean over consecutive sample pairs ``(i, i+1)`` of ``sum_d delta[i, d] * delta[i+1, d]``.

    This is not the paper's formula. The paper builds each network's ``B x B`` correlation
    matrix with a (Taylor-approximated) Gaussian RBF kernel and penalises
    ``||C_t - C_s||^2 / B^2``; RepDistiller received the code above from the authors, and
    the published CC numbers (RepDistiller's and SemCKD's tables) come from it, so we keep
    it. It needs ``B >= 2`` (a single sample has no pair; the reference gives NaN).
    """

    def forward(self, f_s, f_t):
        delta = (f_s - f_t).abs()
        return (delta[:-1] * delta[1:]).sum(1).mean()


@register('correlation')
class CCDistiller(Distiller):
    """``--distill correlation``: ``Correlation(embed_s(feat_s[-1]), embed_t(feat_t[-1]))``.

    ``embed_s``/``embed_t`` are ``LinearEmbed`` heads to ``--feat_dim`` dimensions. Both are
    trained, the teacher's included, as in the reference (that is how CC was run; the
    teacher network itself stays fixed). A batch of one sample contributes zero.
    """
    display_name = 'CC'
    source = 'HobbitLong/RepDistiller distiller_zoo/CC.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 0.02}

    @classmethod
    def add_arguments(cls, parser):
        shared_argument(parser, '--feat_dim', default=128, type=int, help='embedding size (CC, CRD)')

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        if opt.feat_dim < 1:
            raise UserError('--feat_dim must be a positive integer, got {}'.format(opt.feat_dim))
        self.embed_s = LinearEmbed(feat_s[-1][0].numel(), opt.feat_dim)
        self.embed_t = LinearEmbed(feat_t[-1][0].numel(), opt.feat_dim)
        self.criterion = Correlation()

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        if feat_s[-1].shape[0] < 2:
            return zero_loss(logit_s)
        f_s = self.embed_s(feat_s[-1])
        f_t = self.embed_t(feat_t[-1].detach())
        return self.criterion(f_s, f_t)
