"""CAT-KD: Guo et al., "Class Attention Transfer Based Knowledge Distillation", CVPR 2023.

Checked against GzyAftermath/CAT-KD ``mdistiller/distillers/CAT_KD.py`` (``CAT_loss``,
``_Normalize``), ``mdistiller/engine/cfg.py`` (``CFG.CAT_KD``), ``configs/cifar100/CAT_KD/*.yaml``,
``tools/train.py`` (the ``if_test`` conversion) and the ``*_test`` networks of
``mdistiller/models/cifar/*.py``.

What the method computes (the ``CAT_KD`` configs: ``onlyCAT: False``)::

    loss = CE_WEIGHT * CE(logit_s, y) + weight * CAT_loss(CAM_s, CAM_t, resolution, normalize)

* Class activation maps (``class_activation_maps``): the classifier applied at every
  position of the last feature map, as a 1x1 convolution *without bias* --
  ``CAM[n, k] = sum_c W[k, c] * A[n, c]``. ``A`` is the map the network's global pooling
  reads (``models.util.PoolInput``): for WRN after the final BN-ReLU, for MobileNetV2
  after the 1x1 conv to 1280 channels, for ShuffleV2 after ``conv2``, else ``feats[-2]``.
  The reference builds this into the networks: every CIFAR config sets ``if_test: True``,
  which swaps teacher and student for ``*_test`` variants whose ``fc`` is a bias-free
  ``conv_test`` placed before the pooling.
* Teacher: its trained ``fc`` weight is copied into ``conv_test``; its bias is dropped.
  Computed under ``no_grad``; the teacher's classifier is never trained.
* Student: its own CAMs from its own classifier weight, which the CAT loss trains along
  with the backbone. Its classifier has no bias and its logits are the pooled CAMs
  (``logits = mean_hw CAM``, equal to a bias-free ``fc`` on the pooled vector): the adapter
  reproduces this with ``drop_classifier_bias(model_s)`` (bias zeroed and frozen).
* ``CAT_loss``: both CAM sets average-pooled to ``CAM_RESOLUTION`` x ``CAM_RESOLUTION``,
  optionally L2-normalised per (sample, class) over the pooled positions (``F.normalize``
  over dims (2, 3), eps 1e-12), then the MSE averaged over all elements. The weight is
  applied outside, as here.
* No KL term (the loop's alpha is 0), no warm-up (the distiller never reads the epoch),
  no change of prediction beyond the dropped bias.
* Options the CAT_KD configs leave off (not implemented here): ``IF_BINARIZE`` (teacher
  CAMs thresholded at their mean), ``IF_OnlyTransferPartialCAMs`` (only the top/bottom
  ``CAMs_Nums`` classes of the teacher's logits), ``onlyCAT`` (no CE; the "CAT" experiments
  with ``CE_WEIGHT: 0``) and the ``transfer`` distiller type (a new classifier trained on a
  copied backbone). None has a teacher-classifier-only switch.
* ``PAIR_CONFIGS``: weight (``CAT_loss_weight``), ``CAM_RESOLUTION`` and ``IF_NORMALIZE`` of
  the eleven CIFAR-100 configs; a pair they do not list gets the code's defaults
  (``DEFAULTS``: 400, 2, True) -- such a pair has no published CAT-KD configuration, and
  those are the code's defaults, not tuned values. All configs: 240 epochs, batch 64, SGD
  lr 0.05 (0.01 for ShuffleV1/ShuffleV2/MobileNetV2 students), decay at 150/180/210 -- the
  common protocol.
* Adapter (``--distill catkd``): ``-r 1 -a 0 -b 1`` (``-a`` unused: ``replaces_kd``); the
  pair's values through ``--cat_loss_weight``, ``--cam_resolution`` and
  ``--cat_normalize/--no-cat_normalize``. The reference's ``*_test`` networks are not
  built: the CAMs come from the unchanged networks' classifier weights and the map their
  pooling reads (``models.util.ClassifierMap``), which is the same computation; the
  student's bias is dropped in place (``drop_classifier_bias``) when the adapter is built,
  before the optimiser. The distiller has no parameters of its own.

Code versus paper: the paper's text was not at hand when this file was written, so no
difference is asserted; note that the same-architecture configs switch normalisation
off (``IF_NORMALIZE: False``) and that the CAMs carry no classifier bias -- the code is
followed.
"""
import argparse

import torch
import torch.nn.functional as F

from helper.errors import UserError
from models.util import ClassifierMap, get_classifier

from .registry import Distiller, register

# --------------------------------------------------------------- facts the adapter needs

CE_WEIGHT = 1.0          # CFG.CAT_KD.LOSS.CE_WEIGHT (every CAT_KD config)
USES_KD = False          # no KL(T) term: the loop's alpha is 0
WARMUP_EPOCHS = 0        # none
CHANGES_PREDICTION = False   # the student predicts with its own (bias-free) classifier
STUDENT_CLASSIFIER_BIAS = False
TEACHER_CLASSIFIER_BIAS = False

# cfg.py defaults: what the code runs for a pair without a config
DEFAULTS = dict(weight=400.0, resolution=2, normalize=True)

# (teacher, student) -> configs/cifar100/CAT_KD/<file>.yaml
PAIR_CONFIGS = {
    ('resnet56', 'resnet20'): dict(weight=0.7, resolution=2, normalize=False),       # res56_res20
    ('resnet110', 'resnet32'): dict(weight=1.8, resolution=2, normalize=False),      # res110_res32
    ('resnet32x4', 'resnet8x4'): dict(weight=15.0, resolution=2, normalize=False),   # res32x4_res8x4
    ('wrn_40_2', 'wrn_16_2'): dict(weight=12.0, resolution=2, normalize=False),      # wrn_40_2_wrn_16_2
    ('wrn_40_2', 'wrn_40_1'): dict(weight=1.5, resolution=2, normalize=False),       # wrn_40_2_wrn_40_1
    ('vgg13', 'vgg8'): dict(weight=4.5, resolution=2, normalize=False),              # vgg13_vgg8
    ('vgg13', 'MobileNetV2'): dict(weight=15.0, resolution=2, normalize=True),       # vgg13_mv2
    ('ResNet50', 'MobileNetV2'): dict(weight=40.0, resolution=2, normalize=True),    # res50_mv2
    ('wrn_40_2', 'ShuffleV1'): dict(weight=80.0, resolution=4, normalize=True),      # wrn40_2_shuv1
    ('resnet32x4', 'ShuffleV1'): dict(weight=600.0, resolution=4, normalize=True),   # res32x4_shuv1
    ('resnet32x4', 'ShuffleV2'): dict(weight=600.0, resolution=4, normalize=True),   # res32x4_shuv2
}


def pair_config(model_t, model_s):
    """The published weight / CAM resolution / normalisation of a pair, else the code's defaults."""
    return dict(PAIR_CONFIGS.get((model_t, model_s), DEFAULTS))


# --------------------------------------------------------------- CAMs and the loss

def class_activation_maps(feature_map, fc_weight):
    """(N, C, H, W) map and (K, C) classifier weight -> (N, K, H, W) CAMs, no bias (``conv_test``)."""
    return F.conv2d(feature_map, fc_weight[:, :, None, None])


def drop_classifier_bias(model):
    """Make the student's classifier bias-free, as the reference's ``*_test`` students.

    The bias is zeroed and frozen (``requires_grad`` False, so it never reaches the
    optimiser), so the logits equal the spatial mean of the student's CAMs.
    """
    bias = get_classifier(model).bias
    if bias is not None:
        with torch.no_grad():
            bias.zero_()
        bias.requires_grad_(False)


def _Normalize(feat, IF_NORMALIZE):
    if IF_NORMALIZE:
        feat = F.normalize(feat, dim=(2, 3))
    return feat


def CAT_loss(CAM_Student, CAM_Teacher, CAM_RESOLUTION, IF_NORMALIZE):
    """MSE between the CAMs average-pooled to ``CAM_RESOLUTION``², optionally L2-normalised
    per (sample, class) first (reference name and signature; unweighted)."""
    CAM_Student = F.adaptive_avg_pool2d(CAM_Student, (CAM_RESOLUTION, CAM_RESOLUTION))
    CAM_Teacher = F.adaptive_avg_pool2d(CAM_Teacher, (CAM_RESOLUTION, CAM_RESOLUTION))
    return F.mse_loss(_Normalize(CAM_Student, IF_NORMALIZE), _Normalize(CAM_Teacher, IF_NORMALIZE))


@register('catkd')
class CATKDDistiller(Distiller):
    """``--distill catkd``: ``weight * CAT_loss(CAMs of the student, CAMs of the teacher, resolution, normalize)``.

    The CAMs are each network's classifier weight applied to the map its global pooling reads
    (``models.util.ClassifierMap``: ``feats[-2]`` where that is the pooled tensor, else a
    hook); the teacher's under ``no_grad``, from the original teacher's classifier. The
    student's classifier bias is zeroed and frozen when the adapter is built
    (``drop_classifier_bias``), before the optimiser is; its weight is trained by the CE and
    the CAT loss. No KL term (``replaces_kd``). ``--cat_loss_weight``, ``--cam_resolution``
    and ``--cat_normalize`` default to the pair's config (``PAIR_CONFIGS``), else to the
    code's defaults (``DEFAULTS``) for a pair the authors publish no configuration for.
    """
    display_name = 'CAT-KD'
    source = 'GzyAftermath/CAT-KD mdistiller/distillers/CAT_KD.py, configs/cifar100/CAT_KD/*.yaml'
    weights = {'gamma': CE_WEIGHT, 'alpha': 0.0, 'beta': 1.0}
    replaces_kd = not USES_KD
    changes_prediction = CHANGES_PREDICTION

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument('--cat_loss_weight', type=float, default=None,
                            help="CAT-KD: weight of the CAT loss (default: the pair's config, else {:g})".format(
                                DEFAULTS['weight']))
        parser.add_argument('--cam_resolution', type=int, default=None,
                            help="CAT-KD: size the CAMs are pooled to (default: the pair's config, else {})".format(
                                DEFAULTS['resolution']))
        parser.add_argument('--cat_normalize', action=argparse.BooleanOptionalAction, default=None,
                            help="CAT-KD: L2-normalise the pooled CAMs (default: the pair's config, else {})".format(
                                DEFAULTS['normalize']))

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        from dataset import image_size
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        if model_s is None or model_t is None:
            raise ValueError('CAT-KD reads both classifiers: build it with model_s and model_t')
        config = pair_config(getattr(opt, 'model_t', None), getattr(opt, 'model_s', None))
        for key, flag in (('weight', 'cat_loss_weight'), ('resolution', 'cam_resolution'),
                          ('normalize', 'cat_normalize')):
            if getattr(opt, flag, None) is not None:
                config[key] = getattr(opt, flag)
        if config['weight'] < 0:
            raise UserError('--cat_loss_weight must be 0 or more, got {:g}'.format(config['weight']))
        if config['resolution'] < 1:
            raise UserError('--cam_resolution must be 1 or more, got {}'.format(config['resolution']))
        self.weight, self.resolution, self.normalize = config['weight'], config['resolution'], config['normalize']
        drop_classifier_bias(model_s)
        # plain references, not submodules: the student's classifier is saved with the student, the
        # teacher's is frozen
        self.classifiers = (get_classifier(model_s), get_classifier(model_t))
        size = image_size(getattr(opt, 'dataset', 'cifar100'))
        self.map_s = ClassifierMap(model_s, size)
        self.map_t = ClassifierMap(model_t, size)

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        fc_s, fc_t = self.classifiers
        cam_s = class_activation_maps(self.map_s(feat_s), fc_s.weight)
        with torch.no_grad():
            cam_t = class_activation_maps(self.map_t(feat_t), fc_t.weight)
        return {'cat': self.weight * CAT_loss(cam_s, cam_t, self.resolution, self.normalize)}
