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
  (``DEFAULTS``: 400, 2, True). All configs: 240 epochs, batch 64, SGD lr 0.05 (0.01 for
  ShuffleV1/ShuffleV2/MobileNetV2 students), decay at 150/180/210 -- the common protocol.

Code versus paper: the paper's text was not at hand when this file was written, so no
difference is asserted; note that the same-architecture configs switch normalisation
off (``IF_NORMALIZE: False``) and that the CAMs carry no classifier bias -- the code is
followed.
"""
import torch
import torch.nn.functional as F

from models.util import get_classifier

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
