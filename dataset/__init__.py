"""Data sets and loaders. ``get_dataloaders(opt, data_mode)`` is the one entry the training scripts use.

Train batches by ``data_mode``: ``'plain'`` (x, y); ``'instance'`` (x, y, index) for methods with a memory
bank; ``'crd'`` (x, y, index, contrast_idx) with contrast_idx LongTensor [B, nce_k + 1], column 0 the positive.
With ``extra_views > 0`` a batch is a dict ``{'input', 'target', ..., 'views': [x2, ...]}``. One wrapper,
``dataset.wrappers.MethodData``, adds all of this to every data set. Validation batches are always (x, y).
"""
import hashlib
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from helper.errors import UserError

NUM_CLASSES = {'cifar100': 100, 'synthetic': 100, 'imagenet': 1000, 'imagenette': 10}
DATA_MODES = ('plain', 'instance', 'crd')
# CRD's negatives with replacement, as the reference's ImageFolder variant (a draw without replacement
# would shuffle 1.28 M indices per image); without, unless k exceeds them, on the CIFAR-sized sets
CRD_WITH_REPLACEMENT = ('imagenet', 'imagenette')


def image_size(dataset):
    if dataset not in NUM_CLASSES:
        raise UserError('unknown --dataset %r; choose one of %s' % (dataset, ', '.join(NUM_CLASSES)))
    return 224 if dataset in ('imagenet', 'imagenette') else 32


def build_datasets(opt, data_mode='plain', extra_views=0, view_transform=None):
    """-> (train_set, val_set) for ``opt.dataset``; the training set carries what ``data_mode`` and
    ``extra_views`` ask for."""
    if opt.dataset not in NUM_CLASSES:
        raise UserError('unknown --dataset %r; choose one of %s' % (opt.dataset, ', '.join(NUM_CLASSES)))
    if data_mode not in DATA_MODES:
        raise ValueError('data_mode must be one of %s, got %r' % (DATA_MODES, data_mode))
    # imported here so that a CIFAR run never imports the ImageNet code and its dependencies, and back
    if opt.dataset == 'cifar100':
        from dataset import cifar100
        train_set, val_set = cifar100.build_datasets(opt)
    elif opt.dataset == 'synthetic':
        from dataset import synthetic
        train_set, val_set = synthetic.build_datasets(opt)
    else:
        from dataset import imagenet
        train_set, val_set = imagenet.build_datasets(opt, NUM_CLASSES[opt.dataset])
    if data_mode != 'plain' or extra_views:
        from dataset.wrappers import MethodData
        train_set = MethodData(train_set, data_mode, k=getattr(opt, 'nce_k', 16384), mode=getattr(opt, 'mode', 'exact'),
                               replace=True if opt.dataset in CRD_WITH_REPLACEMENT else None,
                               extra_views=extra_views, view_transform=view_transform)
    return train_set, val_set


def test_set_identity(val_set):
    """A digest of what a model is evaluated on: the images and labels of ``val_set`` and its transform; None
    when the set cannot say (a model's accuracy on it is then never reused)."""
    h = hashlib.sha256()
    if hasattr(val_set, 'identity'):
        h.update(val_set.identity().encode())
    elif hasattr(val_set, 'data') and hasattr(val_set, 'targets'):  # held in memory (CIFAR)
        h.update(np.ascontiguousarray(val_set.data).tobytes())
        h.update(np.asarray(val_set.targets, dtype=np.int64).tobytes())
    elif hasattr(val_set, 'samples') and hasattr(val_set, 'root'):  # an ImageFolder: its files and labels
        for path, label in val_set.samples:
            h.update('{}\t{}\n'.format(os.path.relpath(path, val_set.root), label).encode())
    else:
        return None
    h.update(repr(getattr(val_set, 'transform', None)).encode())
    return h.hexdigest()


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``, in order, without padding.

    DistributedSampler pads the shards to equal length by repeating images, which would
    count those images twice in a validation accuracy reduced across processes.
    """

    def __init__(self, n, world_size, rank):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def data_order_seed(opt):
    """The seed of the training order: ``--seed``; else the one the processes of a run share
    (``opt.data_seed``, drawn on rank 0 by helper.distributed); else a fresh draw (trials must differ
    when no seed is given)."""
    for seed in (getattr(opt, 'seed', None), getattr(opt, 'data_seed', None)):
        if seed is not None:
            return int(seed)
    return int(torch.randint(0, 2 ** 31 - 1, ()).item())


def pin_memory(opt):
    """Pinned host memory only for a process that trains on a GPU (pinning creates a CUDA context)."""
    device = getattr(opt, 'device', None)
    if device is None:
        return torch.cuda.is_available() and not getattr(opt, 'cpu_procs', 0)
    return torch.device(device).type == 'cuda'


def get_dataloaders(opt, data_mode='plain', drop_last=False, extra_views=0, view_transform=None):
    """-> (train_loader, val_loader, train_sampler, n_data).

    The training order comes from a sampler whose ``set_epoch(epoch)`` fixes the
    permutation of that epoch from (seed, epoch) alone, so a resumed run sees exactly the
    order an uninterrupted one would; the training loop calls it every epoch. In a
    distributed run it is a DistributedSampler over the processes (validation uses
    unpadded shards). ``n_data`` is the number of training samples. ``drop_last`` applies
    to the train loader only. ``extra_views``/``view_transform``: the method's extra augmented views.

    With ``--gpu_loader`` (CIFAR-100, synthetic) the training set lives on the device and the
    train loader, which is also the ``train_sampler``, augments whole batches there
    (``dataset/gpu_loader.py``).
    """
    if getattr(opt, 'gpu_loader', False):
        from dataset.gpu_loader import get_gpu_dataloaders
        return get_gpu_dataloaders(opt, data_mode, drop_last, extra_views, view_transform)
    if getattr(opt, 'dali', None):
        return _dali_loaders(opt, data_mode, drop_last, extra_views)
    train_set, val_set = build_datasets(opt, data_mode, extra_views, view_transform)
    batch_size = int(opt.batch_size)
    num_workers = int(getattr(opt, 'num_workers', 0) or 0)
    seed = data_order_seed(opt)
    world_size, rank = (int(opt.world_size), int(opt.rank)) if getattr(opt, 'distributed', False) else (1, 0)
    train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=int(seed))
    val_sampler = ShardSampler(len(val_set), world_size, rank) if world_size > 1 else None

    per_replica = len(train_sampler)
    if drop_last and per_replica < batch_size:
        # a loader with no batch would make every epoch silently empty
        raise UserError('the training set gives %d images per process, fewer than one batch of --batch_size %d '
                        '(this method drops incomplete batches); lower --batch_size' % (per_replica, batch_size))

    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory(opt))
    # fresh training workers every epoch: persistent ones would carry their random streams from epoch to
    # epoch, which a resumed run cannot reproduce (it starts new workers), so its augmentations would differ
    train_loader = DataLoader(train_set, sampler=train_sampler, drop_last=drop_last, **common)
    val_loader = DataLoader(val_set, shuffle=False, sampler=val_sampler, persistent_workers=num_workers > 0,
                            **common)
    return train_loader, val_loader, train_sampler, len(train_set)


def _dali_loaders(opt, data_mode, drop_last, extra_views=0):
    if opt.dataset not in ('imagenet', 'imagenette'):
        raise UserError('--dali reads ImageNet-style folders; drop --dali for --dataset %s' % opt.dataset)
    if data_mode != 'plain':
        raise UserError('--dali cannot give the sample indices this method needs (%s batches); drop --dali'
                        % data_mode)
    if extra_views:
        raise UserError('--dali cannot give the extra augmented views this method needs; drop --dali')
    from dataset.imagenet_dali import get_dali_dataloaders
    train_loader, val_loader, n_data = get_dali_dataloaders(opt, drop_last=drop_last)
    return train_loader, val_loader, None, n_data
