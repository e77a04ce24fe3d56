"""DKD: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.

Reference code: megvii-research/mdistiller (commit a08d46f) ``mdistiller/distillers/DKD.py`` (``dkd_loss``,
the masks, the warm-up), ``mdistiller/engine/cfg.py`` (defaults) and ``configs/cifar100/dkd/*.yaml``
(per-pair overrides).

KD's KL divergence split in two parts, weighted separately:

- TCKD, target-class KD: KL between the binary distributions (p_target, 1 - p_target) of teacher and student;
- NCKD, non-target-class KD: KL between the distributions over the non-target classes, renormalised.

``dkd_loss = alpha * TCKD + beta * NCKD``, each multiplied by ``T^2`` and divided by the batch size.

The method's total loss in mdistiller is ``CE_WEIGHT * CE + min(epoch / WARMUP, 1) * dkd_loss``, with
mdistiller's 1-based epoch (the first epoch already has weight 1/20). There is no plain KD term: DKD replaces
the ``-a`` term (``replaces_kd``), and the loop's CE weight is ``CE_WEIGHT``.

Reference values (``cfg.py``): CE_WEIGHT 1.0, ALPHA 1.0, BETA 8.0, T 4.0, WARMUP 20; the configs override
only BETA (``CIFAR_PAIRS``). resnet32x4 -> resnet8x4 uses the defaults (76.32 in mdistiller's table). The
configs' solver (batch 64, 240 epochs, lr 0.05 or 0.01 for MobileNetV2/ShuffleNet students, steps at
150/180/210, weight decay 5e-4) is the common protocol.

How the code computes it (followed here, where it departs from the paper's clean definitions):

- the binary distributions are sums of the full softmax's probabilities (``cat_mask``) and their log is
  ``torch.log`` of those sums, not a log-softmax: a student probability that underflows to 0 gives inf;
- the non-target distribution is not built by deleting the target class: the target logit gets
  ``- 1000`` after the division by T, which drives its probability to 0 in float32 (and the KL term of a
  zero teacher probability is 0);
- ``target.shape[0]`` is the batch size the sums are divided by.
"""
import torch
import torch.nn.functional as F

CE_WEIGHT = 1.0
ALPHA = 1.0
BETA = 8.0
TEMPERATURE = 4.0
WARMUP = 20

# (teacher, student) in our model_dict names -> mdistiller configs/cifar100/dkd/*.yaml (defaults filled in)
_DEFAULTS = dict(ce_weight=CE_WEIGHT, alpha=ALPHA, beta=BETA, temperature=TEMPERATURE, warmup=WARMUP)
CIFAR_PAIRS = {
    ('resnet32x4', 'resnet8x4'): dict(_DEFAULTS),
    ('resnet32x4', 'ShuffleV1'): dict(_DEFAULTS),
    ('resnet32x4', 'ShuffleV2'): dict(_DEFAULTS),
    ('ResNet50', 'MobileNetV2'): dict(_DEFAULTS),
    ('wrn_40_2', 'ShuffleV1'): dict(_DEFAULTS),
    ('resnet110', 'resnet32'): dict(_DEFAULTS, beta=2.0),
    ('resnet56', 'resnet20'): dict(_DEFAULTS, beta=2.0),
    ('vgg13', 'MobileNetV2'): dict(_DEFAULTS, beta=6.0),
    ('vgg13', 'vgg8'): dict(_DEFAULTS, beta=6.0),
    ('wrn_40_2', 'wrn_16_2'): dict(_DEFAULTS, beta=6.0),
    ('wrn_40_2', 'wrn_40_1'): dict(_DEFAULTS, beta=6.0),
}


def pair_settings(model_t, model_s):
    """ce_weight, alpha, beta, temperature, warmup for a pair; the cfg.py defaults for unlisted pairs."""
    return dict(CIFAR_PAIRS.get((model_t, model_s), _DEFAULTS))


def warmup_factor(epoch, warmup=WARMUP):
    """The reference's ``min(epoch / warmup, 1)`` for a 1-based epoch."""
    return min(epoch / warmup, 1.0)


def dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    """``alpha * TCKD + beta * NCKD`` for logits ``(batch, classes)`` and integer labels ``target``."""
    gt_mask = _get_gt_mask(logits_student, target)
    other_mask = _get_other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction='sum') * temperature ** 2 / target.shape[0]
    # masking by a large negative logit rather than dropping the column keeps the shapes rectangular
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction='sum')
                 * temperature ** 2 / target.shape[0])
    return alpha * tckd_loss + beta * nckd_loss


def _get_gt_mask(logits, target):
    target = target.reshape(-1)
    return torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()


def _get_other_mask(logits, target):
    target = target.reshape(-1)
    return torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()


def cat_mask(t, mask1, mask2):
    """``[sum of t over mask1, sum of t over mask2]`` per row, shape ``(batch, 2)``."""
    t1 = (t * mask1).sum(dim=1, keepdim=True)
    t2 = (t * mask2).sum(dim=1, keepdim=True)
    return torch.cat([t1, t2], dim=1)
