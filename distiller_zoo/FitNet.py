"""FitNet: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015."""
import torch.nn as nn

from helper.errors import UserError
from models.util import ConvReg

from .registry import Distiller, register


class HintLoss(nn.Module):
    """Mean squared error between the regressed student hint and the teacher's guided layer.

    ``forward(f_s, f_t)`` returns ``mean((f_s - f_t)^2)`` over every element. The paper
    trains the hint in a separate first stage and uses half the summed squared error; the
    reference (and we) add the mean squared error to the ordinary loss for the whole run,
    weighted by ``-b``.
    """

    def __init__(self):
        super().__init__()
        self.crit = nn.MSELoss()

    def forward(self, f_s, f_t):
        return self.crit(f_s, f_t)


@register('hint')
class FitNetDistiller(Distiller):
    """``--distill hint``: ``HintLoss(ConvReg(feat_s[h]), feat_t[h])`` with ``h = --hint_layer``.

    Owns the ``ConvReg`` regressor (trained with the student).
    """
    display_name = 'FitNet'
    source = 'HobbitLong/RepDistiller distiller_zoo/FitNet.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 100}

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument('--hint_layer', default=1, type=int, help='FitNet: index into the feature list')

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        h = opt.hint_layer
        valid = [i for i in range(min(len(feat_s), len(feat_t)))
                 if feat_s[i].dim() == 4 and feat_t[i].dim() == 4]
        if h not in valid:
            raise UserError('--hint_layer {} is not a feature map of both student and teacher; '
                            'choose one of {}'.format(h, ', '.join(str(i) for i in valid)))
        self.hint_layer = h
        self.regressor = ConvReg(feat_s[h].shape, feat_t[h].shape)
        self.criterion = HintLoss()

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        f_s, f_t = self.regressor(feat_s[self.hint_layer], feat_t[self.hint_layer].detach())
        return self.criterion(f_s, f_t)
