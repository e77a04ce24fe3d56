"""SimKD: Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022.

Checked against DefangChen/SimKD ``models/util.py`` (``SimKD``), ``train_student.py``
(construction, optimiser, checkpoint), ``helper/loops.py`` (``train_distill``,
``validate_distill``), ``scripts/run_distill.sh`` and ``README.md``.

What the method computes::

    trans_feat_s, trans_feat_t, pred_feat_s = SimKD(s_n=C_s, t_n=C_t, factor=2)(feat_s[-2], feat_t[-2], cls_t)
    loss = MSE(trans_feat_s, trans_feat_t)          # nn.MSELoss(): mean over all elements

* Weights: the reference runs ``-c 0 -d 0 -b 1`` (``WEIGHTS``): no CE, no KD, only the
  feature loss. ``loss_cls``/``loss_div`` are still computed, on the student's *own*
  logits, and multiplied by 0; so the student's own classifier is never trained and the
  teacher's classifier receives no gradient from the loss at all.
* Features: ``feat_s[-2]``/``feat_t[-2]``, the last stage's maps (post-activation), of
  the RepDistiller-style ``is_feat`` lists, which ours equal for every family SimKD ships
  (resnet, vgg, MobileNetV2, ShuffleV1, ShuffleV2, ResNet50). ``s_n``/``t_n`` are their
  channel counts. For resnet, vgg, ShuffleV1 and ResNet teachers ``feat_t[-2]`` is exactly
  the map the teacher's classifier reads before pooling. A WRN teacher (SimKD's repository
  has no WRN) is the exception: its ``feat_t[-2]`` is the raw block output, before the
  final BN-ReLU. The map the classifier reads is ``models.util.PoolInput(model_t).feature``,
  which equals ``feat_t[-2]`` for the teachers above (tested for resnet32x4) and is what
  the adapter should pass as ``feat_t``. (MobileNetV2/ShuffleV2 teachers: ``feat_t[-2]``
  does not even have the classifier's width, and the reference would fail.)
* Spatial alignment: the taller of the two maps is average-pooled to the other's size.
* Projector ``transfer`` (parameter names ``transfer.{0,3,6}.weight`` convolutions without
  bias; ``transfer.{1,4,7}.*`` BatchNorm): 1x1 conv ``s_n -> t_n // factor``, BN, ReLU, 3x3
  conv, BN, ReLU, 1x1 conv to ``t_n``, BN, ReLU.
* Prediction (``CHANGES_PREDICTION``): ``cls_t(avgpool(trans_feat_s))`` with the teacher's
  own classifier (``get_feat_modules()[-1]`` in the reference, ``models.util.get_classifier``
  here), frozen. The reference uses it for training accuracy and for validation (teacher
  run, modules in eval mode) and so for its best-checkpoint choice. Validation needs only
  the teacher's spatial size (``student_prediction``), not its features.
* Reference checkpoint: only the best epoch, ``{'epoch', 'model': model_s.state_dict(),
  'best_acc', 'proj': SimKD.state_dict()}`` (``proj`` keys ``transfer.*``); the teacher's
  classifier is not saved -- evaluating needs the teacher checkpoint. Ours should hold the
  classifier too (issue 12).
* ``FACTOR`` 2 is the repository's default and the README's headline row (78.08);
  its table also lists factors 4 and 8 (``--simkd_factor``).
* Adapter (``--distill simkd``): ``-r 0 -a 0 -b 1``; the loop still computes the CE and
  KL terms on the student's own logits (weight 0), as the reference does, so DDP finds
  every student parameter in the graph. The distiller holds the projector
  (``proj.transfer.*``: the reference's ``proj`` entry) and a frozen copy of the teacher's
  classifier (``cls_t.*``), so our checkpoint, unlike the reference's, predicts without
  the teacher file. ``predict`` is the prediction above (validation, best checkpoint,
  ``scripts/eval.py``); the training accuracy is ``pred_feat_s`` of the training pass, as
  in the reference. Under DDP the projector's batch-norm statistics are rank 0's at
  validation (``StudentPredictor``), as the reference's DDP-wrapped projector gets them.
* No warm-up.

Code versus paper: the paper's text was not at hand when this file was written, so no
difference is asserted; the code's loss is the element-mean squared error (``nn.MSELoss``)
and its ``loss_cls``/``loss_div`` terms are computed with weight 0 -- the code is followed.
"""
import copy

import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError
from models.util import ClassifierMap, get_classifier

from .registry import Distiller, register

# --------------------------------------------------------------- facts the adapter needs

WEIGHTS = {'gamma': 0.0, 'alpha': 0.0, 'beta': 1.0}   # scripts/run_distill.sh: -c 0 -d 0 -b 1
FACTOR = 2                 # train_student.py -f default
USES_KD = False
WARMUP_EPOCHS = 0
CHANGES_PREDICTION = True
CHECKPOINT_KEYS = ('epoch', 'model', 'best_acc', 'proj')   # the reference's best checkpoint


def _align(feat_s, t_H):
    # the student is pooled down when it is the taller map
    s_H = feat_s.shape[2]
    return F.adaptive_avg_pool2d(feat_s, (t_H, t_H)) if s_H > t_H else feat_s


class SimKD(nn.Module):
    """CVPR-2022: Knowledge Distillation with the Reused Teacher Classifier (reference name/signature).

    ``forward(feat_s, feat_t, cls_t)`` returns ``(trans_feat_s, trans_feat_t, pred_feat_s)``:
    the projected student map, the teacher map (pooled to the student's size if taller)
    and the teacher classifier's logits on the pooled projected map.
    """

    def __init__(self, *, s_n, t_n, factor=2):
        super(SimKD, self).__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))

        def conv1x1(in_channels, out_channels, stride=1):
            return nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, stride=stride, bias=False)

        def conv3x3(in_channels, out_channels, stride=1, groups=1):
            return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride, bias=False,
                             groups=groups)

        # a bottleneck keeps the projector small
        self.transfer = nn.Sequential(
            conv1x1(s_n, t_n // factor),
            nn.BatchNorm2d(t_n // factor),
            nn.ReLU(inplace=True),
            conv3x3(t_n // factor, t_n // factor),
            nn.BatchNorm2d(t_n // factor),
            nn.ReLU(inplace=True),
            conv1x1(t_n // factor, t_n),
            nn.BatchNorm2d(t_n),
            nn.ReLU(inplace=True),
        )

    def forward(self, feat_s, feat_t, cls_t):
        s_H, t_H = feat_s.shape[2], feat_t.shape[2]
        if s_H > t_H:
            source = F.adaptive_avg_pool2d(feat_s, (t_H, t_H))
            target = feat_t
        else:
            source = feat_s
            target = F.adaptive_avg_pool2d(feat_t, (s_H, s_H))
        trans_feat_t = target
        trans_feat_s = self.transfer(source)
        temp_feat = self.avg_pool(trans_feat_s)
        pred_feat_s = cls_t(temp_feat.view(temp_feat.size(0), -1))
        return trans_feat_s, trans_feat_t, pred_feat_s


def student_prediction(simkd, feat_s, t_H, cls_t):
    """``forward``'s ``pred_feat_s`` without the teacher's features: ``t_H`` is the height
    of the teacher map (known from the probe pass), the only thing the reference's
    validation takes from them."""
    temp_feat = simkd.avg_pool(simkd.transfer(_align(feat_s, t_H)))
    return cls_t(temp_feat.view(temp_feat.size(0), -1))


@register('simkd')
class SimKDDistiller(Distiller):
    """``--distill simkd``: ``MSE(SimKD projector(feat_s[-2]), teacher map)``; the student predicts
    through the projector and the teacher's classifier.

    The teacher map is the one its classifier reads (``models.util.ClassifierMap``:
    ``feat_t[-2]`` for every teacher the reference ships, the hooked pool input for WRN,
    MobileNetV2 and ShuffleV2 teachers). The projector (``proj.transfer.*``, the reference's
    ``proj`` checkpoint entry) is trained with the student; a frozen copy of the teacher's
    classifier (``cls_t.*``, ``requires_grad`` False, so never in the optimiser) sits in the
    distiller, so the student checkpoint is self-contained: ``predict`` needs no teacher.
    Validation, the best-checkpoint choice and the training accuracy use ``predict``
    (``changes_prediction``); the loop still computes the CE and KL terms on the student's own
    logits, weighted by the reference's ``-r 0 -a 0``.
    """
    display_name = 'SimKD'
    source = 'DefangChen/SimKD models/util.py, train_student.py, helper/loops.py, scripts/run_distill.sh'
    weights = dict(WEIGHTS)
    changes_prediction = CHANGES_PREDICTION

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument('--simkd_factor', type=int, default=FACTOR,
                            help="SimKD: the projector's bottleneck is the teacher's width / factor (the "
                                 "reference's -f)")

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        from dataset import image_size
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        if model_t is None:
            raise ValueError("SimKD reuses the teacher's classifier: build it with model_t")
        if feat_s[-2].dim() != 4:
            raise UserError("SimKD needs the student's last feature map (feat[-2]) to be a 4-D map")
        factor = getattr(opt, 'simkd_factor', FACTOR)
        self.map_t = ClassifierMap(model_t, image_size(getattr(opt, 'dataset', 'cifar100')))
        _, t_n, self.t_H, _ = self.map_t.shape
        if factor < 1 or t_n // factor < 1:
            raise UserError('--simkd_factor must lie in 1..{} (the teacher map has {} channels), got {}'.format(
                t_n, t_n, factor))
        self.proj = SimKD(s_n=feat_s[-2].shape[1], t_n=t_n, factor=factor)
        self.cls_t = copy.deepcopy(get_classifier(model_t)).requires_grad_(False)
        self.train_prediction = None

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        trans_feat_s, trans_feat_t, pred_feat_s = self.proj(feat_s[-2], self.map_t(feat_t), self.cls_t)
        self.train_prediction = pred_feat_s.detach()
        return {'simkd': F.mse_loss(trans_feat_s, trans_feat_t)}

    def predict(self, feat_s, logit_s):
        return student_prediction(self.proj, feat_s[-2], self.t_H, self.cls_t)
