"""IRG: Liu et al., "Knowledge Distillation via Instance Relationship Graph", CVPR 2019."""
import torch
import torch.nn as nn

from helper.errors import UserError

from .registry import Distiller, register


class IRGLoss(nn.Module):
    """Instance-relationship-graph loss, as in the authors' code used by RepDistiller/SemCKD.

    ``forward(f_s, f_t, transform_s, transform_t, no_edge_transform=False)``:

    * graph term (weight ``w_graph``): MSE between the student's and the teacher's
      max-normalised squared pairwise-distance matrices of ``f_s``/``f_t`` (edges), plus
      ``MSE(f_s, f_t)`` when the two have the same shape (vertices);
    * transform term (weight ``w_transform``): the lists ``transform_s``/``transform_t`` are
      paired up in order and consumed two layers at a time, ``(l0, l1), (l2, l3), ...`` (an odd
      last layer is unused). For each step ``l1 -> l2`` it adds the squared difference between
      how much the student's and the teacher's distance matrices change,
      ``(MSE(D(l1_s), D(l2_s)) - MSE(D(l1_t), D(l2_t)))^2`` (unless ``no_edge_transform``), and
      the same for the features themselves when ``l1``/``l2`` have equal shapes on both sides.
    """

    def __init__(self, w_graph=1, w_transform=1):
        super(IRGLoss, self).__init__()
        self.mseloss = nn.MSELoss()
        self.w_graph = w_graph
        self.w_transform = w_transform

    def forward(self, f_s, f_t, transform_s, transform_t, no_edge_transform=False):
        student = f_s.reshape(f_s.shape[0], -1)
        teacher = f_t.reshape(f_t.shape[0], -1)
        with torch.no_grad():
            t_d = self.pdist(teacher, squared=True)
        loss = self.mseloss(self.pdist(student, squared=True), t_d)
        if f_s.shape == f_t.shape:
            loss = loss + self.mseloss(f_s, f_t)
        loss = loss * self.w_graph

        layers = list(zip(transform_s, transform_t))
        for (l1_s, l1_t), (l2_s, l2_t) in zip(layers[0::2], layers[1::2]):
            loss = loss + self.transform_loss(l1_s, l2_s, l1_t, l2_t, not no_edge_transform) * self.w_transform
        return loss

    def transform_loss(self, l1_s, l2_s, l1_t, l2_t, edge_transform=True):
        """How the relations change from layer 1 to layer 2, student against teacher."""
        loss = 0
        if edge_transform:
            change_s = self.mseloss(self._flat_pdist(l1_s), self._flat_pdist(l2_s))
            with torch.no_grad():
                change_t = self.mseloss(self._flat_pdist(l1_t), self._flat_pdist(l2_t))
            loss = loss + self.mseloss(change_s, change_t)
        if l1_s.shape == l2_s.shape and l1_t.shape == l2_t.shape:
            with torch.no_grad():
                change_t = self.mseloss(l1_t, l2_t)
            loss = loss + self.mseloss(self.mseloss(l1_s, l2_s), change_t)
        return loss

    def _flat_pdist(self, x):
        return self.pdist(x.reshape(x.shape[0], -1), squared=True)

    @staticmethod
    def pdist(e, squared=False, eps=1e-12, normalization='max'):
        """Pairwise (squared) Euclidean distances, zero diagonal, divided by their max."""
        e_square = e.pow(2).sum(dim=1)
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * (e @ e.t())).clamp(min=eps)
        if not squared:
            res = res.sqrt()
        diagonal = torch.eye(len(e), dtype=torch.bool, device=e.device)
        res = res.masked_fill(diagonal, 0)
        if normalization == 'max':
            res = res / (res.max() + eps)
        return res


@register('irg')
class IRGDistiller(Distiller):
    """``--distill irg``: ``IRGLoss`` on ``feat_s[-1]``/``feat_t[-1]`` (reference weights 1, 1),
    with the transform layers ``feat[i]`` for ``i`` in ``--transform_layer_s``/``--transform_layer_t``
    and ``--no_edge_transform``. Both lists must be equally long (layers pair up in order).
    """
    display_name = 'IRG'
    source = 'DefangChen/SemCKD distiller_zoo/IRG.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 0.005}

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument('--transform_layer_t', nargs='+', type=int, default=[],
                            help='IRG: teacher transform layers')
        parser.add_argument('--transform_layer_s', nargs='+', type=int, default=[],
                            help='IRG: student transform layers')
        parser.add_argument('--no_edge_transform', action='store_true', help='IRG: drop the edge-transform term')

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        self.transform_layer_s = list(getattr(opt, 'transform_layer_s', None) or [])
        self.transform_layer_t = list(getattr(opt, 'transform_layer_t', None) or [])
        self.no_edge_transform = bool(getattr(opt, 'no_edge_transform', False))
        for flag, layers, feats in (('--transform_layer_s', self.transform_layer_s, feat_s),
                                    ('--transform_layer_t', self.transform_layer_t, feat_t)):
            for i in layers:
                if not -len(feats) <= i < len(feats):
                    raise UserError('{} {} is out of range: this network has {} features (indices 0..{})'.format(
                        flag, i, len(feats), len(feats) - 1))
        if len(self.transform_layer_s) != len(self.transform_layer_t):
            raise UserError('--transform_layer_s and --transform_layer_t must list the same number of layers '
                            '(got {} and {})'.format(len(self.transform_layer_s), len(self.transform_layer_t)))
        self.criterion = IRGLoss()

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        transform_s = [feat_s[i] for i in self.transform_layer_s]
        transform_t = [feat_t[i].detach() for i in self.transform_layer_t]
        return self.criterion(feat_s[-1], feat_t[-1].detach(), transform_s, transform_t, self.no_edge_transform)
