"""What a distillation method asks of the training set, added to any data set of ``(img, target)`` items.

``MethodData(base, data_mode, ...)`` gives, per ``Distiller.data_mode``:

* ``'plain'``: ``(img, target)``, the base data set's item;
* ``'instance'``: ``(img, target, index)``, the sample's index in the data set (memory banks);
* ``'crd'``: ``(img, target, index, contrast_idx)``, with CRD's ``[positive, k negatives]`` from
  ``ContrastSampler`` (RepDistiller's ``CIFAR100InstanceSample`` / ``ImageFolderSample``).

With ``extra_views > 0`` an item is a dict instead, ``{'input', 'target', 'index'?, 'contrast_idx'?,
'views'}``, ``views`` a list of that many more augmented copies of the image: the base data set's own
training augmentation drawn again, or ``view_transform`` applied to the un-augmented image (the base must
then have a ``transform`` attribute). The random draws happen in the order image, contrast indices, views,
so that a method without views sees exactly the draws of the former per-data-set classes.
"""
import copy

import numpy as np
import torch
from torch.utils.data import Dataset

from helper.errors import UserError


class ContrastSampler:
    """CRD's contrast indices for one sample: ``[positive, k negatives]`` as a LongTensor of length k + 1.

    Semantics of RepDistiller's ``CIFAR100InstanceSample``: the positive is the sample itself (``'exact'``) or a
    random sample of its class (``'relax'``); negatives are drawn uniformly from the samples of every other
    class, without replacement unless k exceeds their number (``replace=None``), or always with replacement
    (``replace=True``, as the reference's ImageFolder variant does).

    The reference materialises one negative list per class (O(N * classes) Python work, and ragged arrays
    that numpy >= 1.24 refuses when classes are unbalanced). Here the samples are sorted by class once; the
    negatives of class c are that order with c's block left out, so a draw is k positions in
    [0, N - n_c) shifted past the block.
    """

    def __init__(self, labels, k, mode='exact', replace=None):
        if mode not in ('exact', 'relax'):
            raise UserError("--mode must be 'exact' or 'relax', got %r" % (mode,))
        if int(k) < 1:
            raise UserError('--nce_k must be at least 1, got %r' % (k,))
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if labels.numel() and labels.min() < 0:
            raise ValueError('labels must be non-negative')
        self.k = int(k)
        self.mode = mode
        self.replace = replace
        self.n = labels.numel()
        self.order = torch.argsort(labels, stable=True)
        self.count = torch.bincount(labels)
        self.start = torch.cumsum(self.count, 0) - self.count

    def __call__(self, index, target):
        start, count = int(self.start[target]), int(self.count[target])
        n_neg = self.n - count
        if n_neg == 0:
            raise UserError('CRD needs samples from at least two classes; every training sample has label %d'
                            % target)
        replace = self.k > n_neg if self.replace is None else self.replace
        if replace:
            pos_in_neg = torch.randint(n_neg, (self.k,))
        else:
            pos_in_neg = torch.randperm(n_neg)[:self.k]
        negatives = self.order[pos_in_neg + count * (pos_in_neg >= start)]
        if self.mode == 'exact':
            positive = int(index)
        else:
            positive = int(self.order[start + int(torch.randint(count, ()))])
        return torch.cat([torch.tensor([positive]), negatives])


def layout(data_mode, x, target, index=None, contrast_idx=None, views=None):
    """An item (or a batch) in the layout of ``data_mode``, a dict when there are extra ``views``."""
    extra = [index] if data_mode != 'plain' else []
    if data_mode == 'crd':
        extra.append(contrast_idx)
    if views is None:
        return (x, target, *extra)
    item = dict(zip(('input', 'target', 'index', 'contrast_idx'), [x, target] + extra))
    item['views'] = views
    return item


class MethodData(Dataset):
    """``base`` (items ``(img, target)``, labels in ``base.targets``) with what the method needs added.

    ``k``/``mode``/``replace``: CRD's ``--nce_k``, ``--mode`` and the draw of negatives (see
    ``ContrastSampler``), used for ``data_mode='crd'`` only.
    """

    def __init__(self, base, data_mode='plain', k=16384, mode='exact', replace=None, extra_views=0,
                 view_transform=None):
        if data_mode not in ('plain', 'instance', 'crd'):
            raise ValueError("data_mode must be 'plain', 'instance' or 'crd', got %r" % (data_mode,))
        self.base = base
        self.data_mode = data_mode
        self.extra_views = int(extra_views)
        self.targets = base.targets
        self.sampler = ContrastSampler(self.targets, k, mode, replace) if data_mode == 'crd' else None
        self.view_base = base
        if self.extra_views and view_transform is not None:
            if not hasattr(base, 'transform'):
                raise UserError('this method augments its extra views itself, which the %s data set cannot do; '
                                'choose another data set' % type(base).__name__)
            self.view_base = copy.copy(base)
            self.view_base.transform = view_transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, target = self.base[index]
        # sampled by the true label, not a target_transform'ed one
        contrast_idx = self.sampler(index, self.targets[index]) if self.sampler is not None else None
        views = [self.view_base[index][0] for _ in range(self.extra_views)] if self.extra_views else None
        return layout(self.data_mode, img, target, index, contrast_idx, views)
