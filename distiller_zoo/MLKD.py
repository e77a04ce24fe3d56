"""MLKD: Jin et al., "Multi-Level Logit Distillation", CVPR 2023.

Reference code: Jin-Ying/Multi-Level-Logit-Distillation (commit 5ee473f) ``mdistiller/distillers/KD_ours.py``
(the losses and the masks), ``mdistiller/dataset/cifar100.py`` and ``imagenet.py`` (the weak and strong
views, ``RandAugment``), ``mdistiller/engine/trainer.py`` (``AugTrainer``), ``tools/train_ours.py``,
``mdistiller/engine/cfg.py`` and ``configs/cifar100/ours/*.yaml``. The logit-standardisation variant is
sunshangquan/logit-standardization-KD ``mdistiller/distillers/MLKD.py`` (see LS.py).

Every training image is seen twice: a weak view (the common random crop and flip) and a strong view (the
same, then ``RandAugment(2, 10)``: two random PIL operations and a cutout; ``strong_transform``). Student and
teacher run on both views. Three alignments, each at five temperatures (the base T and 3, 5, 2, 6):

- instance level, ``kd_loss`` (LS.py's, identical to the reference's with ``logit_stand=False``): KD on the
  weak view, scaled by the confidence mask, plus KD on the strong view (unmasked);
- batch level, ``bc_loss``: squared difference of the (batch x batch) Gram matrices of the softened
  predictions, summed and divided by the batch size; weak view, scaled by the sample mask;
- class level, ``cc_loss``: the same with the (classes x classes) Gram matrices, divided by the number of
  classes; weak view, scaled by the class mask.

No T^2 factor on ``cc_loss``/``bc_loss`` (there is one in ``kd_loss``). The method's total loss is
``CE_WEIGHT * (CE(weak) + CE(strong)) + kd + cc + bc`` with every term already multiplied by ``KD_WEIGHT``
(``mlkd_loss``). There is no separate KD term: MLKD replaces the ``-a`` term, the loop's CE (weak view) has
weight ``CE_WEIGHT``, and the adapter adds ``CE_WEIGHT * CE(strong)``. Training accuracy is the weak view's.

Reference values (cfg.py's KD section; the configs set only the solver): T = 4, CE_WEIGHT 0.1, KD_WEIGHT 0.9,
batch 64, weight decay 5e-4, lr steps at 150/180/210 whatever the number of epochs. Per pair
(``CIFAR_PAIRS``) the configs differ in epochs and learning rate; resnet32x4 -> resnet8x4 is 240 epochs at lr
0.025 today. The history matters for comparing numbers: the first commit (6327e73, March 2023) ran every pair
480 epochs (mobile students at lr 0.0025), the next (77b91ec) moved the mobile students to lr 0.01 and the
ShuffleNet students to 960 epochs, and only in September 2024 (5ee473f) did the same-family pairs drop to 240.
The paper's 77.08 for resnet32x4 -> resnet8x4 predates that, and LS's MLKD+LS log ran 480 epochs. Our default
is the common 240-epoch protocol; ``ORIGINAL_EPOCHS`` is the documented alternative.

How the code computes it (followed here; where it departs from what its structure suggests):

- the masks multiply an already batch-averaged loss (the ``reduce=False`` arguments are commented out), so
  "masking" scales the weak-view kd and bc terms by the fraction of samples whose teacher confidence is at
  most the batch median, and the cc term by the fraction of classes whose summed teacher probability is at
  most the median over classes: about one half, not a per-sample selection;
- the "strong" instance term uses the strong view at T, 3 and 5 but the weak view at 2 and 6;
- the reference also computes strong-view cc and bc terms and then drops them; they are not computed here;
- the medians are ``np.percentile(..., 50)`` of the teacher's weak-view softmax (T = 1); here
  ``torch.quantile`` (the same linear interpolation) in float64 on the tensor's device.
"""
import random
import textwrap

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torchvision import transforms

from helper.errors import UserError

from . import LS
from .LS import kd_loss
from .registry import Distiller, register

TEMPERATURE = 4.0
CE_WEIGHT = 0.1
KD_WEIGHT = 0.9
EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # after the base T, in the reference's order
ORIGINAL_EPOCHS = 480

# (teacher, student) in our model_dict names -> (epochs, lr) of configs/cifar100/ours/*.yaml at 5ee473f
CIFAR_PAIRS = {
    ('resnet32x4', 'resnet8x4'): (240, 0.025),
    ('resnet110', 'resnet32'): (240, 0.025),
    ('resnet56', 'resnet20'): (240, 0.025),
    ('vgg13', 'vgg8'): (240, 0.025),
    ('wrn_40_2', 'wrn_16_2'): (240, 0.025),
    ('wrn_40_2', 'wrn_40_1'): (240, 0.025),
    ('ResNet50', 'MobileNetV2'): (480, 0.01),
    ('vgg13', 'MobileNetV2'): (480, 0.01),
    ('wrn_40_2', 'ShuffleV1'): (480, 0.01),
    ('resnet32x4', 'ShuffleV1'): (960, 0.01),
    ('resnet32x4', 'ShuffleV2'): (960, 0.01),
}

# the same at the first commit (6327e73), the protocol of the paper's table: 480 epochs everywhere
ORIGINAL_CIFAR_PAIRS = {
    ('resnet32x4', 'resnet8x4'): (480, 0.025),
    ('resnet110', 'resnet32'): (480, 0.025),
    ('resnet56', 'resnet20'): (480, 0.025),
    ('vgg13', 'vgg8'): (480, 0.025),
    ('wrn_40_2', 'wrn_16_2'): (480, 0.025),
    ('wrn_40_2', 'wrn_40_1'): (480, 0.025),
    ('ResNet50', 'MobileNetV2'): (480, 0.0025),
    ('vgg13', 'MobileNetV2'): (480, 0.0025),
    ('wrn_40_2', 'ShuffleV1'): (480, 0.0025),
    ('resnet32x4', 'ShuffleV1'): (480, 0.01),
    ('resnet32x4', 'ShuffleV2'): (480, 0.01),
}


def temperatures(base=TEMPERATURE):
    """The five temperatures of every alignment: the base T, then 3, 5, 2, 6."""
    return (float(base),) + EXTRA_TEMPERATURES


def cc_loss(logits_student, logits_teacher, temperature, reduce=True):
    """Class-level alignment: ``||P_t^T P_t - P_s^T P_s||^2 / classes`` with ``P = softmax(z / T)``."""
    batch_size, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student.transpose(1, 0), pred_student)
    teacher_matrix = torch.mm(pred_teacher.transpose(1, 0), pred_teacher)
    squared = (teacher_matrix - student_matrix) ** 2
    return squared.sum() / class_num if reduce else squared / class_num


def bc_loss(logits_student, logits_teacher, temperature, reduce=True):
    """Batch-level alignment: ``||P_t P_t^T - P_s P_s^T||^2 / batch`` with ``P = softmax(z / T)``."""
    batch_size, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student, pred_student.transpose(1, 0))
    teacher_matrix = torch.mm(pred_teacher, pred_teacher.transpose(1, 0))
    squared = (teacher_matrix - student_matrix) ** 2
    return squared.sum() / batch_size if reduce else squared / batch_size


def _at_most_median(values):
    values = values.double()
    return values <= torch.quantile(values, 0.5)


def confidence_masks(logits_teacher_weak):
    """(sample mask ``(batch,)``, class mask ``(classes,)``) from the teacher's weak-view softmax at T = 1:
    samples whose top probability, and classes whose probability summed over the batch, are at most the
    median."""
    pred_teacher_weak = F.softmax(logits_teacher_weak.detach(), dim=1)
    confidence = pred_teacher_weak.max(dim=1).values
    class_confidence = pred_teacher_weak.sum(dim=0)
    return _at_most_median(confidence), _at_most_median(class_confidence)


def mlkd_loss(logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong,
              temperature=TEMPERATURE, kd_weight=KD_WEIGHT, logit_stand=False):
    """The reference's ``loss_kd``, ``loss_cc`` and ``loss_bc`` as ``{'kd', 'cc', 'bc'}`` (weights applied).

    ``temperature`` is the base T (LS: its base temperature); ``logit_stand`` reaches only the kd terms.
    CE (both views) is not included.
    """
    sample_mask, class_mask = confidence_masks(logits_teacher_weak)
    # the reference multiplies batch-mean losses by the masks and averages: only the kept fraction matters
    sample_fraction = sample_mask.to(logits_student_weak.dtype).mean()
    class_fraction = class_mask.to(logits_student_weak.dtype).mean()
    temps = temperatures(temperature)

    kd_weak = sum(kd_loss(logits_student_weak, logits_teacher_weak, t, logit_stand=logit_stand) for t in temps)
    # as in the reference, the "strong" term reads the weak view at its last two temperatures (2 and 6)
    kd_strong = (sum(kd_loss(logits_student_strong, logits_teacher_strong, t, logit_stand=logit_stand)
                     for t in temps[:3])
                 + sum(kd_loss(logits_student_weak, logits_teacher_weak, t, logit_stand=logit_stand)
                       for t in temps[3:]))
    cc_weak = sum(cc_loss(logits_student_weak, logits_teacher_weak, t) for t in temps)
    bc_weak = sum(bc_loss(logits_student_weak, logits_teacher_weak, t) for t in temps)
    return {
        'kd': kd_weight * (sample_fraction * kd_weak + kd_strong),
        'cc': kd_weight * class_fraction * cc_weak,
        'bc': kd_weight * sample_fraction * bc_weak,
    }


# ---- the strong view: the reference's RandAugment (FixMatch's variant, not torchvision's) ----

CUTOUT_MAX = 0.5                   # cutout side: uniform in [0, 0.5) of the image width
CUTOUT_COLOR = (125, 123, 114)


def auto_contrast(img, _):
    return ImageOps.autocontrast(img)


def brightness(img, v):
    return ImageEnhance.Brightness(img).enhance(v)


def color(img, v):
    return ImageEnhance.Color(img).enhance(v)


def contrast(img, v):
    return ImageEnhance.Contrast(img).enhance(v)


def equalize(img, _):
    return ImageOps.equalize(img)


def identity(img, _):
    return img


def posterize(img, v):
    return ImageOps.posterize(img, max(1, int(v)))


def rotate(img, v):
    return img.rotate(v)  # degrees, about the centre; nearest neighbour, black corners


def sharpness(img, v):
    return ImageEnhance.Sharpness(img).enhance(v)


# The affine ops map each output pixel (x, y) to the input (a x + b y + c, d x + e y + f), about the top-left
# corner, nearest neighbour, black outside; translations are fractions of the image size.
def shear_x(img, v):
    return img.transform(img.size, Image.Transform.AFFINE, (1, v, 0, 0, 1, 0))


def shear_y(img, v):
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, v, 1, 0))


def solarize(img, v):
    return ImageOps.solarize(img, v)


def translate_x(img, v):
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, v * img.size[0], 0, 1, 0))


def translate_y(img, v):
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, v * img.size[1]))


# (operation, low, high): the magnitude is drawn uniformly in [low, high). The enhancement factors are all
# below 1 and Posterize keeps 4 to 7 bits, as in the reference.
AUGMENT_LIST = [
    (auto_contrast, 0, 1),
    (brightness, 0.05, 0.95),
    (color, 0.05, 0.95),
    (contrast, 0.05, 0.95),
    (equalize, 0, 1),
    (identity, 0, 1),
    (posterize, 4, 8),
    (rotate, -30, 30),
    (sharpness, 0.05, 0.95),
    (shear_x, -0.3, 0.3),
    (shear_y, -0.3, 0.3),
    (solarize, 0, 256),
    (translate_x, -0.3, 0.3),
    (translate_y, -0.3, 0.3),
]


def cutout(img, v):
    """Paint a grey square of side ``v * width`` (clipped at the borders); ``v <= 0`` leaves the image."""
    if v <= 0:
        return img
    v = v * img.size[0]
    w, h = img.size
    # the reference draws the centre with np.random.uniform(w), i.e. low=w, high=1: uniform on (1, w]
    x0 = w - (w - 1) * random.random()
    y0 = h - (h - 1) * random.random()
    x0 = int(max(0, x0 - v / 2.0))
    y0 = int(max(0, y0 - v / 2.0))
    x1 = min(w, x0 + v)
    y1 = min(h, y0 + v)
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), CUTOUT_COLOR)
    return img


class RandAugment:
    """``n`` operations drawn with replacement from ``AUGMENT_LIST``, each at a uniform random magnitude in
    its range, then a cutout of uniform random size. ``m`` is accepted and unused, as in the reference."""

    def __init__(self, n, m):
        self.n = n
        self.m = m

    def __call__(self, img):
        for op, low, high in random.choices(AUGMENT_LIST, k=self.n):
            img = op(img, low + float(high - low) * random.random())
        return cutout(img, random.random() * CUTOUT_MAX)


def _clamp_unit(x):
    return x.clamp(0.0, 1.0)


def strong_transform(dataset):
    """The strong view's transform for ``dataset`` (a PIL image in, a normalised tensor out).

    cifar100: RandomCrop(32, padding=4), flip, RandAugment(2, 10), ToTensor, Normalize (the weak view is the
    common train transform). imagenet/imagenette: RandomResizedCrop(224), flip, RandAugment(2, 10), ToTensor,
    Normalize. synthetic (tests): its un-augmented normalised tensor gets the synthetic crop and flip, is
    mapped to an RGB image through CIFAR's statistics, and then follows the CIFAR pipeline.
    """
    if dataset == 'cifar100':
        from dataset.cifar100 import MEAN, STD
        return transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            RandAugment(2, 10),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ])
    if dataset in ('imagenet', 'imagenette'):
        from dataset.imagenet import MEAN, STD
        return transforms.Compose([
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            RandAugment(2, 10),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ])
    if dataset == 'synthetic':
        from dataset.cifar100 import MEAN, STD
        from dataset.synthetic import random_crop_flip
        return transforms.Compose([
            transforms.Lambda(random_crop_flip),
            transforms.Normalize([-m / s for m, s in zip(MEAN, STD)], [1.0 / s for s in STD]),
            transforms.Lambda(_clamp_unit),
            transforms.ToPILImage(),
            RandAugment(2, 10),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ])
    raise UserError("mlkd has no strong augmentation for --dataset %r; use cifar100, imagenet, imagenette "
                    "or synthetic" % (dataset,))


# ---- the adapter

_ORIGINAL = ORIGINAL_CIFAR_PAIRS[('resnet32x4', 'resnet8x4')]
PROTOCOL_HELP = ('Our default is the common protocol (240 epochs, lr 0.05, steps at 150/180/210). MLKD\'s '
                 'published numbers (77.08 for resnet32x4 -> resnet8x4) come from its first configs: {} epochs at '
                 'lr {:g} for same-family pairs, i.e. --epochs {} --learning_rate {:g} (the steps stay at '
                 '150/180/210); today\'s configs run those pairs {} epochs at lr {:g}, the mobile students 480 or '
                 '960 epochs at lr 0.01 (distiller_zoo/MLKD.py).').format(
                     *_ORIGINAL, *_ORIGINAL, *CIFAR_PAIRS[('resnet32x4', 'resnet8x4')])


@register('mlkd')
class MLKDDistiller(Distiller):
    """``--distill mlkd``: ``mlkd_loss`` on the weak view (the loader's input) and one strong view
    (``strong_transform``, ``batch['view_outputs'][0]``), plus the strong view's cross-entropy.

    Terms: ``kd``, ``cc``, ``bc`` (each already times the kd weight, ``--mlkd_kd_weight``, 0.9) and
    ``cls_strong``, the strong view's CE times ``-r`` (the reference weights both views' CE by CE_WEIGHT,
    0.1). They are summed and weighted by ``-b``, whose reference value is therefore 1. It replaces the
    ``-a`` KL term. With ``--logit_stand`` the kd weight and base temperature default to LS's values for
    the pair (``LS.MLKD_PAIRS``). ``original_protocol`` gives the authors' epochs and learning rate.
    """
    display_name = 'MLKD'
    source = ('Jin-Ying/Multi-Level-Logit-Distillation mdistiller/distillers/KD_ours.py, '
              'mdistiller/dataset/cifar100.py, configs/cifar100/ours/')
    weights = {'gamma': CE_WEIGHT, 'alpha': 0, 'beta': 1}
    ls_weights = {'gamma': LS.KD_CE_WEIGHT, 'alpha': 0, 'beta': 1}
    replaces_kd = True
    extra_views = 1

    @classmethod
    def view_transform(cls, dataset):
        return strong_transform(dataset)

    @classmethod
    def add_arguments(cls, parser):
        parser.description = textwrap.fill(PROTOCOL_HELP, 78)
        parser.add_argument('--mlkd_T', type=float, default=None,
                            help='MLKD: base temperature, used with {} (default {:g}; with --logit_stand the '
                                 'pair\'s LS value, {:g})'.format(', '.join('{:g}'.format(t) for t in
                                                                             EXTRA_TEMPERATURES),
                                                                   TEMPERATURE, LS.BASE_TEMP))
        parser.add_argument('--mlkd_kd_weight', type=float, default=None,
                            help='MLKD: weight of its kd, cc and bc terms (default {:g}; with --logit_stand the '
                                 'pair\'s LS value, {:g})'.format(KD_WEIGHT, LS.KD_WEIGHT))
        LS.add_logit_stand_argument(parser)

    @staticmethod
    def original_protocol(model_t, model_s):
        """The first configs' ``{'epochs', 'learning_rate'}`` for a pair (None if it had none)."""
        if (model_t, model_s) not in ORIGINAL_CIFAR_PAIRS:
            return None
        epochs, lr = ORIGINAL_CIFAR_PAIRS[(model_t, model_s)]
        return {'epochs': epochs, 'learning_rate': lr}

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        self.logit_stand = bool(getattr(opt, 'logit_stand', False))
        if self.logit_stand:
            temp, weight = LS.ls_settings('mlkd', getattr(opt, 'model_t', None), getattr(opt, 'model_s', None))
        else:
            temp, weight = TEMPERATURE, KD_WEIGHT
        self.temperature = temp if opt.mlkd_T is None else opt.mlkd_T
        self.kd_weight = weight if opt.mlkd_kd_weight is None else opt.mlkd_kd_weight
        if self.temperature <= 0:
            raise UserError('--mlkd_T must be positive, got {:g}'.format(self.temperature))
        self.ce_weight = opt.gamma

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        _, _, logit_s_strong, logit_t_strong = batch['view_outputs'][0]
        terms = mlkd_loss(logit_s, logit_t, logit_s_strong, logit_t_strong, self.temperature, self.kd_weight,
                          self.logit_stand)
        terms['cls_strong'] = self.ce_weight * F.cross_entropy(logit_s_strong, batch['target'])
        return terms
