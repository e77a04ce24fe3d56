"""CRD's loss (Tian et al., "Contrastive Representation Distillation", ICLR 2020).

Same classes, constructor arguments, attribute names and values as RepDistiller's
``crd/criterion.py``, so code written against it keeps working. One difference:
``ContrastLoss`` returns a 0-dim tensor where the reference returns shape ``[1]``.
"""
import torch
from torch import nn

from models.util import Embed, Normalize  # noqa: F401  (RepDistiller has crd.criterion.Embed)

from .memory import ContrastMemory

eps = 1e-7


class CRDLoss(nn.Module):
    """The two symmetric contrastive losses of CRD (teacher as anchor, student as anchor).

    ``opt`` carries ``s_dim``/``t_dim`` (the student's/teacher's penultimate feature sizes),
    ``feat_dim`` (projection size), ``nce_k`` (negatives per positive), ``nce_t``
    (temperature), ``nce_m`` (memory momentum) and ``n_data`` (training set size: one memory
    row per sample).

    Both embeddings, ``embed_s`` and ``embed_t``, are trainable (the teacher-side one too, as
    CRD was run); they are attributes of this loss, as in RepDistiller.
    """

    def __init__(self, opt):
        super(CRDLoss, self).__init__()
        self.embed_s = Embed(opt.s_dim, opt.feat_dim)
        self.embed_t = Embed(opt.t_dim, opt.feat_dim)
        self.contrast = ContrastMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m)
        self.criterion_t = ContrastLoss(opt.n_data)
        self.criterion_s = ContrastLoss(opt.n_data)

    def forward(self, f_s, f_t, idx, contrast_idx=None):
        """``f_s`` ``[bsz, s_dim]``, ``f_t`` ``[bsz, t_dim]``, ``idx`` the samples' data set
        indices ``[bsz]``, ``contrast_idx`` ``[bsz, nce_k + 1]`` (positive first) or ``None``
        to draw uniform negatives. Returns the summed loss (0-dim)."""
        f_s = self.embed_s(f_s)
        f_t = self.embed_t(f_t)
        out_s, out_t = self.contrast(f_s, f_t, idx, contrast_idx)
        return self.criterion_s(out_s) + self.criterion_t(out_t)


class ContrastLoss(nn.Module):
    """NCE loss of CRD (Eq. 18): ``x`` is ``[bsz, K + 1]`` scores, the positive in column 0.

    With noise probability ``Pn = 1 / n_data`` and ``m = K``:
    ``-(sum_b log(x_b0 / (x_b0 + m Pn + eps)) + sum_bk log(m Pn / (x_bk + m Pn + eps))) / bsz``.
    """

    def __init__(self, n_data):
        super(ContrastLoss, self).__init__()
        self.n_data = n_data

    def forward(self, x):
        bsz = x.shape[0]
        m = x.shape[1] - 1
        noise = m * (1. / self.n_data)
        pos = x[:, 0]
        neg = x[:, 1:]
        log_d1 = torch.log(pos / (pos + noise + eps))
        log_d0 = torch.log(noise / (neg + noise + eps))
        return -(log_d1.sum() + log_d0.sum()) / bsz
