"""ReviewKD: Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021.

Checked against megvii-research/mdistiller ``mdistiller/distillers/ReviewKD.py``,
``mdistiller/engine/cfg.py`` (``CFG.REVIEWKD``), ``configs/cifar100/reviewkd.yaml`` and its
CIFAR models' feature dicts; cross-checked with dvlab-research/ReviewKD
``CIFAR-100/model/reviewkd.py`` (``build_review_kd``, ``hcl``), ``CIFAR-100/train.py`` and
``CIFAR-100/script/reviewKD.sh``. Where the two differ, mdistiller is followed.

What the method computes (both repositories)::

    loss = CE_WEIGHT * CE(logit_s, y)
         + weight * min(epoch / WARMUP_EPOCHS, 1) * hcl_loss(ReviewKD(student levels), teacher levels)

* No KL term: ReviewKD's adapter sets the loop's alpha to 0 (dvlab's ``--use-kl`` is off
  in every script; mdistiller has no KD term). The logits and the prediction are the
  student's own; nothing changes at test time.
* Teacher levels (``teacher_levels``): the teacher's *pre-activation* stage maps without
  the stem, then its pooled vector as a 1x1 map (mdistiller: ``preact_feats[1:] +
  [pooled_feat]``; dvlab: ``is_feat=True, preact=True`` then ``[1:]``).
* Student levels: the student's *post-activation* maps (mdistiller ``STU_PREACT = False``;
  dvlab ``is_feat=True`` without preact), stem included, then its pooled vector as a 1x1
  map; the module keeps the last ``len(in_channels)`` of them, the reference's ``zip``
  truncation. So the adapter needs ``preact=True`` for the teacher and ``False`` for the
  student (``TEACHER_PREACT``/``STUDENT_PREACT``).
* ``ReviewKD`` runs the levels from the deepest (the pooled vector) to the shallowest: each
  ``ABF`` maps its level to ``mid_channel = min(512, in_channels[-1])`` channels (1x1 conv,
  BN), fuses it with the previous (deeper) fused map upsampled to its size (nearest) by a
  2-channel sigmoid attention, resizes to the teacher level's size (nearest) if needed and
  outputs a 3x3 conv + BN to the teacher level's channels. mdistiller reads
  ``MAX_MID_CHANNEL`` but ignores it (512 is hard-coded); so do we.
* ``hcl_loss``: per level, MSE of the maps plus the MSE of their 4x4, 2x2 and 1x1
  adaptive average pools (only the sizes smaller than the map), weighted 1, 1/2, 1/4, 1/8
  and divided by the sum of the weights used; summed over levels.
* Warm-up (``warmup_factor``): mdistiller multiplies by ``min(epoch / 20, 1)`` with
  1-based epochs (0.05 in the first epoch); dvlab by ``min(1, epoch / 20)`` with 0-based
  epochs (0 in the first epoch), one epoch later. We follow mdistiller.
* Shapes and channels: mdistiller has defaults for resnet32x4 -> resnet8x4 only
  (``CFG.REVIEWKD.IN_CHANNELS`` etc.); dvlab's ``build_review_kd`` has them per student
  family (``REFERENCE_SHAPES``; its vgg and MobileNetV2 branches call builders whose
  imports are commented out, so they never ran as released). ``review_config`` derives
  them from the probe features, which reproduces every row of that table (tested) and
  extends to pairs neither repository lists.
* Parameter names: ``abfs.{i}.conv1.{0,1}.*``, ``abfs.{i}.conv2.{0,1}.*`` and, for every
  ABF but ``abfs.0``, ``abfs.{i}.att_conv.0.*``; ``abfs.0`` works on the pooled vector
  (the list is built shallow-to-deep and reversed, as in the reference).
* Weights (mdistiller's key is ``REVIEWKD_WEIGHT``; it has no ``LOSS_WEIGHT``):
  ``PAIR_WEIGHTS`` holds the published per-pair values; ``DEFAULT_WEIGHT`` (1.0, both
  repositories' default) is what their code uses for a pair they publish no value for.
  Such a pair (e.g. vgg13 -> vgg8, ResNet50 -> MobileNetV2) has no published ReviewKD
  configuration: 1.0 is the code's default, not a tuned value.
* Adapter (``--distill reviewkd``): ``-r 1 -a 0 -b 1`` (``-a`` unused: ``replaces_kd``);
  the per-pair weight is ``--reviewkd_weight``, by default the pair's value above; the
  warm-up factor is set in ``on_epoch_start`` from the loop's 1-based epoch; the ABFs are
  the distiller's ``abfs.*`` (mdistiller's names), trained with the student and saved in
  the student checkpoint's ``distiller`` entry.
* Protocol: mdistiller's config is the common one (240 epochs, batch 64, SGD lr 0.05,
  decay 0.1 at 150/180/210, wd 5e-4). dvlab's ``train.py`` differs (batch 128, lr 0.1, or
  0.02 for ShuffleNet/MobileNet students, Nesterov momentum); not carried over.

Code versus paper: the paper's text was not at hand when this file was written, so no
difference is asserted here; the details above that a reader of the paper may not expect
(the halving pyramid weights normalised by their sum, the warm-up, the nearest-neighbour
resizes, the 512-channel cap) are the code's and are followed.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError

from .registry import Distiller, register

# --------------------------------------------------------------- facts the adapter needs

CE_WEIGHT = 1.0            # CFG.REVIEWKD.CE_WEIGHT; dvlab --ce-loss-weight
DEFAULT_WEIGHT = 1.0       # CFG.REVIEWKD.REVIEWKD_WEIGHT; dvlab --kd-loss-weight default
WARMUP_EPOCHS = 20         # CFG.REVIEWKD.WARMUP_EPOCHS; dvlab --kd-warm-up
MAX_MID_CHANNEL = 512      # min(512, in_channels[-1]) in both repositories
USES_KD = False            # no KL(T) term: the loop's alpha is 0
STUDENT_PREACT = False     # CFG.REVIEWKD.STU_PREACT
TEACHER_PREACT = True      # preact_feats[1:]
CHANGES_PREDICTION = False

# (teacher, student) -> REVIEWKD_WEIGHT: mdistiller configs/cifar100/reviewkd.yaml (the
# first pair, 5.0) and dvlab CIFAR-100/script/reviewKD.sh --kd-loss-weight (all pairs).
PAIR_WEIGHTS = {
    ('resnet32x4', 'resnet8x4'): 5.0,
    ('wrn_40_2', 'wrn_16_2'): 5.0,
    ('wrn_40_2', 'wrn_40_1'): 5.0,
    ('wrn_40_2', 'ShuffleV1'): 5.0,
    ('resnet32x4', 'ShuffleV1'): 5.0,
    ('resnet32x4', 'ShuffleV2'): 8.0,
    ('resnet56', 'resnet20'): 0.6,
    ('resnet110', 'resnet32'): 1.0,
}

# dvlab build_review_kd, expanded per (teacher, student) of our zoo. Lists are in the
# reference's orders: in_channels/out_channels shallow-to-deep (the pooled vector last),
# shapes/out_shapes deep-to-shallow (the pooled vector first). out_shapes None = shapes.
# The resnet rows list a fifth shape (32) that the reference's zip never reaches.
REFERENCE_SHAPES = {
    ('resnet32x4', 'resnet8x4'): dict(in_channels=[64, 128, 256, 256], out_channels=[64, 128, 256, 256],
                                      shapes=[1, 8, 16, 32], out_shapes=None),
    ('resnet56', 'resnet20'): dict(in_channels=[16, 32, 64, 64], out_channels=[16, 32, 64, 64],
                                   shapes=[1, 8, 16, 32, 32], out_shapes=None),
    ('resnet110', 'resnet32'): dict(in_channels=[16, 32, 64, 64], out_channels=[16, 32, 64, 64],
                                    shapes=[1, 8, 16, 32, 32], out_shapes=None),
    ('vgg13', 'vgg8'): dict(in_channels=[128, 256, 512, 512, 512], out_channels=[128, 256, 512, 512, 512],
                            shapes=[1, 4, 4, 8, 16], out_shapes=None),
    ('ResNet50', 'vgg8'): dict(in_channels=[128, 256, 512, 512, 512], out_channels=[256, 512, 1024, 2048, 2048],
                               shapes=[1, 4, 4, 8, 16], out_shapes=[1, 4, 8, 16, 32]),
    ('ResNet50', 'MobileNetV2'): dict(in_channels=[12, 16, 48, 160, 1280],
                                      out_channels=[256, 512, 1024, 2048, 2048],
                                      shapes=[1, 2, 4, 8, 16], out_shapes=[1, 4, 8, 16, 32]),
    ('vgg13', 'MobileNetV2'): dict(in_channels=[12, 16, 48, 160, 1280], out_channels=[128, 256, 512, 512, 512],
                                   shapes=[1, 2, 4, 8, 16], out_shapes=[1, 4, 4, 8, 16]),
    ('wrn_40_2', 'ShuffleV1'): dict(in_channels=[240, 480, 960, 960], out_channels=[32, 64, 128, 128],
                                    shapes=[1, 4, 8, 16], out_shapes=[1, 8, 16, 32]),
    ('resnet32x4', 'ShuffleV1'): dict(in_channels=[240, 480, 960, 960], out_channels=[64, 128, 256, 256],
                                      shapes=[1, 4, 8, 16], out_shapes=[1, 8, 16, 32]),
    ('resnet32x4', 'ShuffleV2'): dict(in_channels=[116, 232, 464, 1024], out_channels=[64, 128, 256, 256],
                                      shapes=[1, 4, 8, 16], out_shapes=[1, 8, 16, 32]),
    ('wrn_40_2', 'wrn_16_2'): dict(in_channels=[32, 64, 128, 128], out_channels=[32, 64, 128, 128],
                                   shapes=[1, 8, 16, 32], out_shapes=None),
    ('wrn_40_2', 'wrn_40_1'): dict(in_channels=[16, 32, 64, 64], out_channels=[32, 64, 128, 128],
                                   shapes=[1, 8, 16, 32], out_shapes=None),
}


def pair_weight(model_t, model_s):
    """The published REVIEWKD_WEIGHT of a pair, else the repositories' default (1.0)."""
    return PAIR_WEIGHTS.get((model_t, model_s), DEFAULT_WEIGHT)


def warmup_factor(epoch, warmup_epochs=WARMUP_EPOCHS):
    """mdistiller's ``min(epoch / WARMUP_EPOCHS, 1.0)``; ``epoch`` is 1-based."""
    return min(epoch / warmup_epochs, 1.0)


# --------------------------------------------------------------- levels and shapes

def _as_map(pooled):
    # the pooled vector enters the review as a 1x1 map
    return pooled[:, :, None, None] if pooled.dim() == 2 else pooled


def student_levels(feat_s):
    """The student's ``is_feat`` list (post-activation) as the review reads it: every map,
    the stem included, then the pooled vector as a 1x1 map. ``ReviewKD`` keeps the last
    ``len(in_channels)``."""
    return list(feat_s[:-1]) + [_as_map(feat_s[-1])]


def teacher_levels(feat_t):
    """The teacher's ``is_feat`` list taken with ``preact=True``, as the loss compares it:
    the stage maps without the stem, then the pooled vector as a 1x1 map."""
    return list(feat_t[1:-1]) + [_as_map(feat_t[-1])]


def review_config(feat_s, feat_t):
    """``in_channels``, ``out_channels``, ``shapes``, ``out_shapes`` for a pair, from the
    features of one probe pass (student post-activation, teacher pre-activation).

    One review level per teacher level; the student gives its last as many levels. The
    reference's table (``REFERENCE_SHAPES``) follows this rule for every pair it lists.
    """
    targets = teacher_levels(feat_t)
    sources = student_levels(feat_s)
    if len(sources) < len(targets):
        raise UserError('ReviewKD needs at least as many student feature levels ({}) as teacher levels ({})'.format(
            len(sources), len(targets)))
    sources = sources[len(sources) - len(targets):]
    return dict(
        in_channels=[f.shape[1] for f in sources],
        out_channels=[f.shape[1] for f in targets],
        shapes=[f.shape[2] for f in reversed(sources)],
        out_shapes=[f.shape[2] for f in reversed(targets)],
    )


# --------------------------------------------------------------- the loss and the modules

def hcl_loss(fstudent, fteacher):
    """Hierarchical context loss over paired lists of (N, C, H, W) maps (reference name).

    Per pair: MSE of the maps, plus the MSE of their 4x4, 2x2 and 1x1 average pools for
    the sizes below H, weighted 1/2, 1/4, 1/8 in that order; the sum is divided by the
    sum of the weights used (1 for the maps themselves). Summed over the pairs.
    """
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction='mean')
        cnt = 1.0
        tot = 1.0
        for level in (4, 2, 1):
            if level >= h:
                continue
            cnt /= 2.0
            pooled_s = F.adaptive_avg_pool2d(fs, (level, level))
            pooled_t = F.adaptive_avg_pool2d(ft, (level, level))
            loss = loss + F.mse_loss(pooled_s, pooled_t, reduction='mean') * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


class ABF(nn.Module):
    """Attention-based fusion of one student level with the deeper levels' fused map.

    ``forward(x, y=None, shape=None, out_shape=None)`` returns ``(out, fused)``: ``out`` the
    level's prediction of the teacher map (``out_channel`` x ``out_shape``²), ``fused`` the
    ``mid_channel`` map handed to the next (shallower) level, at ``out_shape`` as in the
    reference (it is resized before ``conv2``). ``y`` is upsampled to ``shape`` (this
    level's own size) before fusing.
    """

    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super(ABF, self).__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        if fuse:
            self.att_conv = nn.Sequential(
                nn.Conv2d(mid_channel * 2, 2, kernel_size=1),
                nn.Sigmoid(),
            )
        else:
            self.att_conv = None
        # the reference's initialisation (att_conv keeps PyTorch's default)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode='nearest')
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode='nearest')
        y = self.conv2(x)
        return y, x


class ReviewKD(nn.Module):
    """The student-side review: one ``ABF`` per level, run from the deepest level up.

    dvlab's ``ReviewKD(student, in_channels, out_channels, shapes, out_shapes)`` without the
    student, which our loop runs itself; the ABFs sit at ``abfs`` as in both references
    (mdistiller's distiller state dict holds them under the same names). Arguments are in
    the reference's orders (see ``REFERENCE_SHAPES``); ``review_config`` derives them.

    ``forward(features)`` takes the student's ``is_feat`` list (post-activation; the last
    entry may be the flat pooled vector) and returns one map per teacher level, shallow to
    deep, to compare with ``teacher_levels(feat_t)`` in ``hcl_loss``.
    """

    def __init__(self, in_channels, out_channels, shapes, out_shapes=None):
        super(ReviewKD, self).__init__()
        self.shapes = list(shapes)
        self.out_shapes = list(shapes if out_shapes is None else out_shapes)
        abfs = nn.ModuleList()
        mid_channel = min(MAX_MID_CHANNEL, in_channels[-1])
        for idx, in_channel in enumerate(in_channels):
            abfs.append(ABF(in_channel, mid_channel, out_channels[idx], idx < len(in_channels) - 1))
        # built shallow-to-deep (the reference's RNG order), run deep-to-shallow
        self.abfs = abfs[::-1]

    def forward(self, features):
        return review(self.abfs, self.shapes, self.out_shapes, features)


def review(abfs, shapes, out_shapes, features):
    """``ReviewKD.forward`` with the ABFs and sizes passed in: the adapter holds ``abfs``
    itself, as mdistiller's distiller does (its state dict keys are ``abfs.*``)."""
    x = student_levels(features)[::-1]
    results = []
    out_features, res_features = abfs[0](x[0], out_shape=out_shapes[0])
    results.append(out_features)
    for level, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out_features, res_features = abf(level, res_features, shape, out_shape)
        results.insert(0, out_features)
    return results


@register('reviewkd')
class ReviewKDDistiller(Distiller):
    """``--distill reviewkd``: ``weight * min(epoch / 20, 1) * hcl_loss(review(student levels), teacher levels)``.

    The student's post-activation and the teacher's pre-activation features
    (``preact_s``/``preact_t``); no KL term (``replaces_kd``); the ABFs (``abfs.*``) are
    trained with the student and saved in the checkpoint. ``weight`` is ``--reviewkd_weight``,
    by default the pair's published value (``PAIR_WEIGHTS``), else 1.0 for a pair neither
    repository publishes a configuration for. The warm-up factor is set per epoch (1-based,
    mdistiller's count), so a resumed run continues it.
    """
    display_name = 'ReviewKD'
    source = ('megvii-research/mdistiller mdistiller/distillers/ReviewKD.py, configs/cifar100/reviewkd.yaml; '
              'dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh')
    weights = {'gamma': CE_WEIGHT, 'alpha': 0.0, 'beta': 1.0}
    preact_s = STUDENT_PREACT
    preact_t = TEACHER_PREACT
    replaces_kd = not USES_KD
    changes_prediction = CHANGES_PREDICTION

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument('--reviewkd_weight', type=float, default=None,
                            help="ReviewKD: weight of the review loss (default: the pair's published value, "
                                 "else {:g})".format(DEFAULT_WEIGHT))

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        weight = getattr(opt, 'reviewkd_weight', None)
        if weight is None:
            weight = pair_weight(getattr(opt, 'model_t', None), getattr(opt, 'model_s', None))
        if weight < 0:
            raise UserError('--reviewkd_weight must be 0 or more, got {:g}'.format(weight))
        self.weight = weight
        review_module = ReviewKD(**review_config(feat_s, feat_t))
        self.abfs = review_module.abfs
        self.shapes, self.out_shapes = review_module.shapes, review_module.out_shapes
        self.warmup = warmup_factor(1)

    def on_epoch_start(self, epoch):
        self.warmup = warmup_factor(epoch)

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        results = review(self.abfs, self.shapes, self.out_shapes, feat_s)
        return {'reviewkd': self.weight * self.warmup * hcl_loss(results, teacher_levels(feat_t))}
