"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError

from .AT import stage_pairs
from .registry import Distiller, register


class VIDLoss(nn.Module):
    """Negative log-likelihood of the teacher's map under a Gaussian predicted from the student's.

    ``regressor`` (three 1x1 convolutions with ReLUs between them) predicts the mean from
    the student map; each teacher channel ``c`` has a learnt variance
    ``softplus(log_scale[c]) + eps``, initialised to ``init_pred_var``.
    ``forward(input, target)`` returns ``mean(0.5 * ((mu - t)^2 / var + log var))`` over
    batch, channels and positions; when heights differ, the taller map is average-pooled to
    the shorter one's (square) size first.

    The paper's per-layer loss is the same expression summed (not averaged) over channels
    and positions, with the constant ``0.5*log(2*pi)`` dropped in both; the reference
    averages, so ``-b`` absorbs the scale. The pooling is the reference's addition.
    """

    def __init__(self, num_input_channels, num_mid_channel, num_target_channels,
                 init_pred_var=5.0, eps=1e-5):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(num_input_channels, num_mid_channel, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(num_mid_channel, num_mid_channel, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(num_mid_channel, num_target_channels, kernel_size=1, bias=False),
        )
        # inverse softplus, so that the initial variance is exactly init_pred_var
        start = math.log(math.expm1(init_pred_var - eps))
        self.log_scale = nn.Parameter(torch.full((num_target_channels,), start))
        self.eps = eps

    def forward(self, input, target):
        s_H, t_H = input.shape[2], target.shape[2]
        if s_H > t_H:
            input = F.adaptive_avg_pool2d(input, (t_H, t_H))
        elif s_H < t_H:
            target = F.adaptive_avg_pool2d(target, (s_H, s_H))
        pred_mean = self.regressor(input)
        pred_var = (F.softplus(self.log_scale) + self.eps).reshape(1, -1, 1, 1)
        neg_log_prob = 0.5 * ((pred_mean - target).pow(2) / pred_var + pred_var.log())
        return neg_log_prob.mean()


@register('vid')
class VIDDistiller(Distiller):
    """``--distill vid``: one ``VIDLoss(C_s, C_t, C_t)`` per stage pair
    ``zip(feat_s[1:-1], feat_t[1:-1])``, summed. The variance nets are trained with the
    student."""
    display_name = 'VID'
    source = 'HobbitLong/RepDistiller distiller_zoo/VID.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 1}

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        if stage_pairs(feat_s, feat_t) < 1:
            raise UserError('--distill vid needs models with at least one stage feature map '
                            '(feature lists of length >= 3); choose other models or another method')
        self.vid = nn.ModuleList(
            VIDLoss(f_s.shape[1], f_t.shape[1], f_t.shape[1])
            for f_s, f_t in zip(feat_s[1:-1], feat_t[1:-1]))

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        pairs = zip(feat_s[1:-1], feat_t[1:-1], self.vid)
        return sum(vid(f_s, f_t.detach()) for f_s, f_t, vid in pairs)
