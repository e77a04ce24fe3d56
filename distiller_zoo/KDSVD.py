"""KDSVD: Lee et al., "Self-supervised Knowledge Distillation Using Singular Value
Decomposition", ECCV 2018.

Checked against HobbitLong/RepDistiller ``distiller_zoo/KDSVD.py`` (the loss),
``train_student.py`` and ``helper/loops.py``. This is RepDistiller's KDSVD, not
megvii-research/mdistiller's ``mdistiller/distillers/KDSVD.py``, which reshapes a map to
``(B, C*H, W)`` and so decomposes another matrix.

How RepDistiller wires KDSVD (``--distill kdsvd``): ``KDSVD()`` (k=1) on the stage maps
``feat[1:-1]`` (after their ReLU), the returned list summed; no extra module, no init stage.
RepDistiller gives no ``-b`` for it (``scripts/run_cifar_distill.sh`` and the README table
have no KDSVD line); mdistiller's CIFAR-100 config (``configs/cifar100/kdsvd.yaml`` with
``mdistiller/engine/cfg.py``) trains its variant with CE weight 1, loss weight 1 and no KD
term, the weights ``REFERENCE`` records.

The value depends on the signs of the singular vectors: the student's are aligned to the
teacher's, but the teacher's own sign (which LAPACK picks) enters the teacher's RBF
between consecutive layers. The loss therefore calls ``torch.svd`` on float32 maps, as the
reference does; that sign choice, and so the value, is reproduced by float32 ``torch.svd``
on the CPU. On a GPU ``torch.svd`` runs another solver, which may pick other signs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError

from .registry import Distiller, register, zero_loss

REFERENCE = dict(
    distill='kdsvd',
    gamma=1.0, alpha=0.0, beta=1.0,  # mdistiller cfg.py KDSVD.LOSS (CE_WEIGHT 1, FEAT_WEIGHT 1); RepDistiller: none
    main_stage_loss=True,
    features=slice(1, -1),           # feat[1:-1], summed over the returned list
    preact=False,
    k=1,                             # KDSVD default, used as is
    init_epochs=0,                   # no init stage
)


def check_kdsvd_pair(s_shapes, t_shapes):
    """Raise ``UserError`` in one line unless every student map has as many channels as
    the teacher map it meets (the student's singular vectors are matched to the teacher's
    in channel space); RepDistiller fails there with a matrix-size error."""
    for i, (s, t) in enumerate(zip(s_shapes, t_shapes)):
        if s[1] != t[1]:
            raise UserError('--distill kdsvd needs equal channel counts at every stage map, but map {} has {} '
                            'channels in the student and {} in the teacher; choose another pair or '
                            'method'.format(i + 1, s[1], t[1]))


def zero_nonfinite_samples(grad):
    """Zero the gradient of every sample that has a non-finite entry."""
    finite = torch.isfinite(grad).flatten(1).all(1)
    return torch.where(finite.reshape(-1, *[1] * (grad.dim() - 1)), grad, torch.zeros_like(grad))


class KDSVD(nn.Module):
    """Distil the relation between the leading right singular vectors of consecutive maps.

    A map ``(B, C, H, W)`` is read as ``B`` matrices of ``H*W`` rows and ``C`` columns; the
    teacher keeps its first ``k`` right singular vectors (in channel space), the student its
    first ``k + 3``, of which, per teacher vector, the one with the largest absolute
    cosine is kept, with the cosine's sign. Both are scaled by the teacher's normalised
    singular values. Between consecutive layers ``i-1, i`` each network gives the RBF
    ``exp(-(v_i[c] - v_(i-1)[d])^2 / 8)`` over channel pairs; the loss is the squared
    difference of the two (teacher side detached, non-finite entries zeroed), summed and
    divided by the batch size. ``forward(g_s, g_t)`` returns ``len(g_s) - 1`` losses.

    As in the reference, non-finite values of the decomposition are zeroed. The
    reference reshapes with ``H*H``; ``H*W`` is the same on the square maps it handles.

    One addition to the reference, in the backward pass only: when a sample's matrix has
    repeated singular values (e.g. two all-zero channels, common after a ReLU), the
    backward of ``torch.svd`` divides 0 by 0 and RepDistiller's student gets NaN
    gradients. Here such a sample's gradient is zeroed, as the authors' TensorFlow code
    does (sseung0703/SSKD_SVD ``nets/Distillation.py``, ``crop_removenan`` in its SVD
    gradient); every finite gradient, and every loss value, is the reference's.
    """

    def __init__(self, k=1):
        super().__init__()
        self.k = k

    def forward(self, g_s, g_t):
        v_sb = None
        v_tb = None
        losses = []
        for i, (f_s, f_t) in enumerate(zip(g_s, g_t)):
            _, s_t, v_t = self.svd(f_t, self.k)
            _, _, v_s = self.svd(f_s, self.k + 3)
            v_s, v_t = self.align_rsv(v_s, v_t)
            s_t = s_t.unsqueeze(1)
            v_t = v_t * s_t
            v_s = v_s * s_t

            if i > 0:
                s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
                t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
                l2loss = (s_rbf - t_rbf.detach()).pow(2)
                losses.append(self.removenan(l2loss).sum())

            v_tb = v_t
            v_sb = v_s

        bsz = g_s[0].shape[0]
        return [l / bsz for l in losses]

    def svd(self, feat, n=1):
        """``(u, s, v)`` of each sample's ``(H*W, C)`` matrix, the first ``n`` columns of
        ``u`` and ``v`` L2-normalised over their entries and the first ``n`` singular values
        L2-normalised together (``n <= 0`` keeps all, unnormalised)."""
        B, C, H, W = feat.shape
        x = feat.reshape(B, C, H * W).transpose(-2, -1)
        if x.requires_grad:
            x.register_hook(zero_nonfinite_samples)
        u, s, v = torch.svd(x)
        u, s, v = self.removenan(u), self.removenan(s), self.removenan(v)
        if n > 0:
            u = F.normalize(u[:, :, :n], dim=1)
            s = F.normalize(s[:, :n], dim=1)
            v = F.normalize(v[:, :, :n], dim=1)
        return u, s, v

    @staticmethod
    def removenan(x):
        return torch.where(torch.isfinite(x), x, torch.zeros_like(x))

    @staticmethod
    def align_rsv(a, b):
        """For each column of ``b``, the column of ``a`` with the largest absolute cosine
        to it, signed so that cosine is positive; returns ``(those columns, b)``."""
        cosine = a.transpose(-2, -1) @ b
        max_abs_cosine, _ = cosine.abs().max(1, keepdim=True)
        mask = torch.where(max_abs_cosine == cosine.abs(), cosine.sign(), torch.zeros_like(cosine))
        return a @ mask, b


@register('kdsvd')
class KDSVDDistiller(Distiller):
    """``--distill kdsvd``: ``sum(KDSVD()(feat_s[1:-1], feat_t[1:-1]))``, as RepDistiller.

    RepDistiller gives no ``-b`` for KDSVD; the reference weights (``-r 1 -a 0 -b 1``) are
    mdistiller's CIFAR-100 ones (``mdistiller/engine/cfg.py``: KDSVD.LOSS CE_WEIGHT 1,
    FEAT_WEIGHT 1; ``configs/cifar100/kdsvd.yaml``: resnet32x4 -> resnet8x4, no KD term),
    which its table's KDSVD row was trained with, on its own variant of the loss (see above).
    A pair whose stage maps differ in channels is refused when the method is built.
    """
    display_name = 'KDSVD'
    source = 'HobbitLong/RepDistiller distiller_zoo/KDSVD.py; weights: megvii-research/mdistiller mdistiller/engine/cfg.py'
    weights = {'gamma': REFERENCE['gamma'], 'alpha': REFERENCE['alpha'], 'beta': REFERENCE['beta']}

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        i = REFERENCE['features']
        check_kdsvd_pair([f.shape for f in feat_s[i]], [f.shape for f in feat_t[i]])
        self.criterion = KDSVD(k=REFERENCE['k'])

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        i = REFERENCE['features']
        # the start value keeps a tensor when there is a single stage map (no pair of layers)
        return sum(self.criterion(feat_s[i], feat_t[i]), zero_loss(logit_s))
