"""SemCKD: Chen et al., "Cross-Layer Distillation with Semantic Calibration", AAAI 2021.

Every student stage is compared with every teacher stage; an attention module decides, per
sample, how much each teacher stage counts for each student stage.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError
from models.util import MLPEmbed

from .registry import Distiller, register


class SemCKDLoss(nn.Module):
    """Attention-weighted feature MSE over all (student stage, teacher stage) pairs.

    ``forward(s_value, f_target, weight)``: ``s_value[i][j]``/``f_target[i][j]`` are the
    projected student map and the teacher map of pair ``(i, j)`` (``SelfA``'s first two
    outputs), ``weight`` the ``(B, n_s, n_t)`` attention. Per sample and pair, the MSE over
    all elements; weighted by the attention, summed, and divided by ``B * n_s``.
    """

    def __init__(self):
        super(SemCKDLoss, self).__init__()
        self.crit = nn.MSELoss(reduction='none')

    def forward(self, s_value, f_target, weight):
        bsz, num_stu, num_tea = weight.shape
        ind_loss = torch.stack([
            torch.stack([self.crit(s_value[i][j], f_target[i][j]).reshape(bsz, -1).mean(-1) for j in range(num_tea)],
                        dim=1)
            for i in range(num_stu)], dim=1)
        return (weight * ind_loss).sum() / (1.0 * bsz * num_stu)


class AAEmbed(nn.Module):
    """Projection of a student map onto a teacher stage's channels:
    1x1 conv to ``2 * num_target_channels``, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv."""

    def __init__(self, num_input_channels=1024, num_target_channels=128):
        super(AAEmbed, self).__init__()
        self.num_mid_channel = 2 * num_target_channels
        mid = self.num_mid_channel
        self.regressor = nn.Sequential(
            nn.Conv2d(num_input_channels, mid, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, num_target_channels, kernel_size=1, bias=False),
        )

    def forward(self, x):
        return self.regressor(x)


class SelfA(nn.Module):
    """SemCKD's cross-layer attention and pairwise projections.

    Args (reference order): ``s_len``/``t_len`` numbers of student/teacher stages,
    ``input_channel`` the batch size (the per-stage ``B x B`` similarity matrices of the
    batch are what the key/query MLPs read, so the module only works for that batch size),
    ``s_n``/``s_t`` the stages' channel counts, ``factor`` the key/query size reduction.

    ``forward(feat_s, feat_t)`` returns ``(proj_value_stu, value_tea, attention)``:

    * ``attention[b, i, j]``: softmax over teacher stages ``j`` of
      ``<query_i(S_i)[b], key_j(T_j)[b]>``, where ``S_i``/``T_j`` are the ``B x B`` Gram
      matrices of the flattened stage maps and ``query_i``/``key_j`` L2-normalised MLPs;
    * ``proj_value_stu[i][j]``/``value_tea[i][j]``: ``regressor{i}_{j}`` (an ``AAEmbed``)
      applied to student map ``i`` and teacher map ``j``, the larger of the two first
      average-pooled to the smaller's size.

    Submodules are ``key_weight{j}``, ``query_weight{i}`` and ``regressor{i}_{j}`` (the
    reference's ``'regressor' + str(i) + str(j)`` collides once there are 10 stages).
    """

    def __init__(self, s_len, t_len, input_channel, s_n, s_t, factor=4):
        super(SelfA, self).__init__()
        self.s_len = s_len
        self.t_len = t_len
        for j in range(t_len):
            setattr(self, 'key_weight{}'.format(j), MLPEmbed(input_channel, input_channel // factor))
        for i in range(s_len):
            setattr(self, 'query_weight{}'.format(i), MLPEmbed(input_channel, input_channel // factor))
        for i in range(s_len):
            for j in range(t_len):
                setattr(self, 'regressor{}_{}'.format(i, j), AAEmbed(s_n[i], s_t[j]))

    def forward(self, feat_s, feat_t):
        bsz = feat_s[0].shape[0]
        # (B, d, n_t) keys and (B, n_s, d) queries, one per stage, from the stages' Gram matrices
        proj_key = torch.stack([getattr(self, 'key_weight{}'.format(j))(self._gram(f, bsz))
                                for j, f in enumerate(feat_t)], dim=2)
        proj_query = torch.stack([getattr(self, 'query_weight{}'.format(i))(self._gram(f, bsz))
                                  for i, f in enumerate(feat_s)], dim=1)
        attention = F.softmax(torch.bmm(proj_query, proj_key), dim=-1)

        proj_value_stu = []
        value_tea = []
        for i, f_s in enumerate(feat_s):
            proj_value_stu.append([])
            value_tea.append([])
            for j, f_t in enumerate(feat_t):
                s_H, t_H = f_s.shape[2], f_t.shape[2]
                if s_H > t_H:
                    f_s_in, target = F.adaptive_avg_pool2d(f_s, (t_H, t_H)), f_t
                else:
                    f_s_in, target = f_s, F.adaptive_avg_pool2d(f_t, (s_H, s_H))
                proj_value_stu[i].append(getattr(self, 'regressor{}_{}'.format(i, j))(f_s_in))
                value_tea[i].append(target)
        return proj_value_stu, value_tea, attention

    @staticmethod
    def _gram(f, bsz):
        f = f.reshape(bsz, -1)
        return f @ f.t()


@register('semckd')
class SemCKDDistiller(Distiller):
    """``--distill semckd``: ``SemCKDLoss(*SelfA(feat_s[1:-1], feat_t[1:-1]))``.

    The attention module (``self_attention``, factor 4) reads ``B x B`` similarity matrices,
    so it is built for ``--batch_size`` and accepts only batches of that size: the loader
    drops the incomplete last batch (``drop_last``), and any other size raises ``ValueError``.
    (The reference silently skipped smaller batches in its training loop.) Under distributed
    training ``--batch_size`` must be the per-process batch size.
    """
    display_name = 'SemCKD'
    source = 'DefangChen/SemCKD distiller_zoo/SemCKD.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 400}
    drop_last = True

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        factor = 4
        if opt.batch_size < factor:
            raise UserError('SemCKD needs --batch_size >= {} (its attention width is batch_size // {}), got {}'.format(
                factor, factor, opt.batch_size))
        self.batch_size = opt.batch_size
        s_n = [f.shape[1] for f in feat_s[1:-1]]
        t_n = [f.shape[1] for f in feat_t[1:-1]]
        self.self_attention = SelfA(len(s_n), len(t_n), opt.batch_size, s_n, t_n, factor=factor)
        self.criterion = SemCKDLoss()

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        bsz = feat_s[0].shape[0]
        if bsz != self.batch_size:
            raise ValueError('SemCKD: the attention module was built for batch size {} and got a batch of {}; '
                             'SemCKD needs every batch at --batch_size (drop_last=True)'.format(self.batch_size, bsz))
        s_value, f_target, weight = self.self_attention(feat_s[1:-1], [f.detach() for f in feat_t[1:-1]])
        return self.criterion(s_value, f_target, weight)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        # the attention's key/query layers are as wide as the batch they were trained with: say so,
        # instead of listing shape mismatches
        saved = state_dict.get('self_attention.key_weight0.linear1.weight')
        if saved is not None and saved.dim() == 2 and saved.shape[1] != self.batch_size:
            raise UserError('SemCKD\'s attention was trained with a per-process batch size of {}, this run uses {}: '
                            'resume with the same --batch_size'.format(saved.shape[1], self.batch_size))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
