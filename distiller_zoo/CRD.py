"""CRD: Tian et al., "Contrastive Representation Distillation", ICLR 2020 (adapter only).

The loss, its embeddings and its memory bank live in ``crd/`` (RepDistiller layout).
"""
import argparse

from crd.criterion import CRDLoss
from helper.errors import UserError

from .registry import Distiller, register, shared_argument


@register('crd')
class CRDDistiller(Distiller):
    """``--distill crd``: ``CRDLoss(feat_s[-1], feat_t[-1], index, contrast_idx)``.

    The loader yields each sample's data set index and ``--nce_k`` negatives (``--mode``
    ``exact``: the positive is the sample itself; ``relax``: another sample of its class).
    The memory bank has one row per training sample: ``opt.n_data`` is the training set's
    size (the reference hard-codes CIFAR-100's 50000). Both embeddings are trained, the
    teacher's included, as CRD was run. The banks and the normalisation constants (fixed by
    the first batch, CRD's design) are buffers, saved in the checkpoint.

    Call it once per backward pass, as the training loop does: the memory is updated in
    place during the forward pass.
    """
    display_name = 'CRD'
    source = 'HobbitLong/RepDistiller crd/criterion.py, crd/memory.py'
    weights = {'gamma': 1, 'alpha': 1, 'beta': 0.8}
    data_mode = 'crd'

    @classmethod
    def add_arguments(cls, parser):
        shared_argument(parser, '--feat_dim', default=128, type=int, help='embedding size (CC, CRD)')
        parser.add_argument('--mode', default='exact', type=str, choices=['exact', 'relax'],
                            help='CRD sampling mode')
        parser.add_argument('--nce_k', default=16384, type=int, help='CRD: negatives per sample')
        parser.add_argument('--nce_t', default=0.07, type=float, help='CRD: softmax temperature')
        parser.add_argument('--nce_m', default=0.5, type=float, help='CRD: memory momentum')

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__(feat_s, feat_t, opt, model_s, model_t)
        if getattr(opt, 'n_data', None) is None:
            raise ValueError('CRD needs opt.n_data, the number of training samples (set it from the loader)')
        if opt.feat_dim < 1:
            raise UserError('--feat_dim must be a positive integer, got {}'.format(opt.feat_dim))
        if opt.nce_k < 1:
            raise UserError('--nce_k must be a positive integer, got {}'.format(opt.nce_k))
        if opt.nce_t <= 0:
            raise UserError('--nce_t must be positive, got {}'.format(opt.nce_t))
        if not 0 <= opt.nce_m <= 1:
            raise UserError('--nce_m must lie in [0, 1], got {}'.format(opt.nce_m))
        # CRDLoss reads its sizes from an opt; give it a copy rather than writing into the run's
        crd_opt = argparse.Namespace(**vars(opt))
        crd_opt.s_dim = feat_s[-1][0].numel()
        crd_opt.t_dim = feat_t[-1][0].numel()
        self.criterion = CRDLoss(crd_opt)

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        return self.criterion(feat_s[-1], feat_t[-1].detach(), batch['index'], batch.get('contrast_idx'))
