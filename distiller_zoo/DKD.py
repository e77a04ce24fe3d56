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

from helper.errors import UserError

from . import LS
from .registry import Distiller, register

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


def ls_pair_settings(model_t, model_s):
    """With ``--logit_stand``: LS's (tools/train.py) alpha and beta times the pair's kd weight, its base
    temperature as T; the warm-up and CE weight of the DKD config."""
    settings = pair_settings(model_t, model_s)
    temp, weight, beta = LS.ls_settings('dkd', model_t, model_s)
    settings.update(alpha=settings['alpha'] * weight,
                    beta=(settings['beta'] if beta is None else beta) * weight, temperature=temp)
    return settings


@register('dkd')
class DKDDistiller(Distiller):
    """``--distill dkd``: ``warmup_factor(epoch) * dkd_loss(logit_s, logit_t, target, alpha, beta, T)``.

    It replaces the ``-a`` KL term; the loop's CE (``-r``, CE_WEIGHT 1) stays. alpha, beta, T and the
    warm-up come from ``--dkd_alpha/--dkd_beta/--dkd_T/--dkd_warmup``, each defaulting to the pair's value
    in ``CIFAR_PAIRS`` (mdistiller's configs) or, with ``--logit_stand``, LS's (``ls_pair_settings``: both
    logits standardised, alpha and beta times its kd weight, its base temperature). A pair missing from the
    table gets the resnet32x4 -> resnet8x4 row (mdistiller's defaults), with a note.
    """
    display_name = 'DKD'
    source = 'megvii-research/mdistiller mdistiller/distillers/DKD.py, configs/cifar100/dkd/'
    weights = {'gamma': CE_WEIGHT, 'alpha': 0, 'beta': 1}
    ls_weights = {'gamma': CE_WEIGHT, 'alpha': 0, 'beta': 1}
    replaces_kd = True

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument('--dkd_alpha', type=float, default=None,
                            help='DKD: TCKD weight (default: the pair\'s, {:g} for resnet32x4 -> resnet8x4)'
                            .format(ALPHA))
        parser.add_argument('--dkd_beta', type=float, default=None,
                            help='DKD: NCKD weight (default: the pair\'s, {:g} for resnet32x4 -> resnet8x4, '
                                 '2 or 6 for some pairs: distiller_zoo/DKD.py)'.format(BETA))
        parser.add_argument('--dkd_T', type=float, default=None,
                            help='DKD: temperature (default: the pair\'s, {:g})'.format(TEMPERATURE))
        parser.add_argument('--dkd_warmup', type=int, default=None,
                            help='DKD: epochs over which its loss weight rises linearly to 1 (default {}; '
                                 '1: no warm-up)'.format(WARMUP))
        LS.add_logit_stand_argument(parser)

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        self.logit_stand = bool(getattr(opt, 'logit_stand', False))
        pair = (getattr(opt, 'model_t', None), getattr(opt, 'model_s', None))
        settings = ls_pair_settings(*pair) if self.logit_stand else pair_settings(*pair)
        given = {'alpha': opt.dkd_alpha, 'beta': opt.dkd_beta, 'temperature': opt.dkd_T, 'warmup': opt.dkd_warmup}
        if self.logit_stand:  # LS's table names a beta, or leaves it to the DKD config
            known = pair in LS.DKD_PAIRS and (LS.DKD_PAIRS[pair][2] is not None or pair in CIFAR_PAIRS)
        else:
            known = pair in CIFAR_PAIRS
        if not known and any(v is None for v in given.values()) and getattr(opt, 'rank', 0) == 0:
            print('note: DKD has no published settings for {} -> {}; using those of resnet32x4 -> resnet8x4 where '
                  'no --dkd_* flag is given'.format(*pair))
        settings.update((k, v) for k, v in given.items() if v is not None)
        if settings['temperature'] <= 0:
            raise UserError('--dkd_T must be positive, got {:g}'.format(settings['temperature']))
        if settings['warmup'] < 1:
            raise UserError('--dkd_warmup must be at least 1 epoch (1: no warm-up), got {}'.format(settings['warmup']))
        self.alpha, self.beta = settings['alpha'], settings['beta']
        self.temperature, self.warmup = settings['temperature'], settings['warmup']
        self.on_epoch_start(1)

    def on_epoch_start(self, epoch):
        self.factor = warmup_factor(epoch, self.warmup)

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        if self.logit_stand:
            logit_s, logit_t = LS.normalize(logit_s), LS.normalize(logit_t)
        return self.factor * dkd_loss(logit_s, logit_t, batch['target'], self.alpha, self.beta, self.temperature)
