"""``--gpu_loader``: the whole CIFAR-sized training set on the run's device, augmented there in batches.

CIFAR-100's training set is 150 MB as uint8, so it fits on any GPU. Holding it there removes the worker
processes, the per-image PIL work (about 0.3 ms per image on one core) and the host-to-device copy: a batch is
one gather from the resident images, then a random crop, a flip and the normalisation as a few tensor ops on
the whole batch. The validation loader stays the standard one (it runs once per epoch, without augmentation).

What each epoch sees, and why:

* Order: ``torch.randperm(N)`` from a CPU generator seeded with ``seed + epoch``, padded and sharded exactly as
  ``DistributedSampler(shuffle=True)`` does it (every ``world_size``-th index from ``rank``, the shards padded
  to equal length by repeating the first indices). So for the same ``--seed`` the GPU loader visits the images
  in the same order as the standard loader, and the order depends on (seed, epoch) only, so a resumed run sees
  what an uninterrupted one would. Drawing N numbers on the host once per epoch costs about a millisecond.
* Augmentation and CRD's negatives: drawn on the device from a ``torch.Generator`` on that device, re-seeded at
  the start of every pass from (seed, epoch, rank). A pass over an epoch is therefore reproducible and
  resumable without saving any generator state.
* Crop: the 32x32 window of the image zero-padded by 4 pixels at an offset drawn uniformly from 0..8 on each
  axis (every shift in [-4, 4]), then a horizontal flip with probability 1/2, as torchvision's
  ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()``. For CIFAR the padding is zero *before*
  normalisation (black, as torchvision pads the PIL image), and ``x / 255`` then ``(x - mean) / std`` repeat
  ``ToTensor`` and ``Normalize`` op for op, so a crop equals the standard pipeline's to the last bit.
* ``--dataset synthetic``: its images are float and already normalised; they are materialised once, without
  augmentation, and kept as float32 (12 KB an image: 61 MB for the default 5000, 614 MB for 50000).
  Quantising them to uint8 would change the data the standard loader gives. The padding is zero, i.e. the mean
  colour, as ``dataset.synthetic.random_crop_flip`` pads.

Batches are in the standard loaders' layout (``dataset.wrappers.layout``), already on the device: ``(x, y)``,
``(x, y, index)`` or ``(x, y, index, contrast_idx)`` with ``x`` float32 [B, 3, 32, 32], ``y`` and ``index`` int64
[B] and ``contrast_idx`` int64 [B, nce_k + 1] (column 0 the positive); with extra views a dict whose ``'views'``
are more draws of the same augmentation. No step synchronises with the host.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from dataset.wrappers import layout
from helper.errors import UserError

PADDING = 4
GPU_LOADER_DATASETS = ('cifar100', 'synthetic')


def _mix_seed(*parts):
    """One 63-bit generator seed from several integers (well mixed, so (s, e) and (s + 1, e - 1) differ)."""
    words = [int(p) % 2 ** 64 for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def epoch_indices(n, seed, epoch, world_size=1, rank=0):
    """This rank's indices of the epoch: DistributedSampler(shuffle=True, drop_last=False)'s, as a LongTensor."""
    g = torch.Generator()
    g.manual_seed(int(seed) + int(epoch))
    order = torch.randperm(n, generator=g)
    total = int(math.ceil(n / world_size)) * world_size
    if total > n:
        # pad by repeating the start of the permutation (several times over if the set is tiny)
        order = torch.cat([order] + [order] * ((total - n) // n) + [order[:(total - n) % n]])
    return order[rank:total:world_size]


class DeviceContrastSampler:
    """CRD's contrast indices for a whole batch, drawn on the device.

    The semantics of ``dataset.wrappers.ContrastSampler`` (with ``replace=None``): column 0 is the positive (the
    sample itself for ``'exact'``, a random sample of its class for ``'relax'``); the other ``k`` columns are
    uniform draws from the samples of the other classes, without replacement unless ``k`` exceeds their number.
    A uniform k-subset without replacement is the k smallest of i.i.d. uniform keys; giving the sample's own
    class keys above 1 keeps it out. That costs B x N random numbers per batch (3.2 M for CIFAR at batch 64),
    which the device draws in well under a millisecond.
    """

    def __init__(self, labels, k, mode, device):
        if mode not in ('exact', 'relax'):
            raise UserError("--mode must be 'exact' or 'relax', got %r" % (mode,))
        if int(k) < 1:
            raise UserError('--nce_k must be at least 1, got %r' % (k,))
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        self.k, self.mode, self.n = int(k), mode, labels.numel()
        count = torch.bincount(labels)
        if int(count.max()) == self.n:
            raise UserError('CRD needs samples from at least two classes; every training sample has label %d'
                            % int(labels[0]))
        self.order = torch.argsort(labels, stable=True).to(device)
        self.count = count.to(device)
        self.start = (torch.cumsum(count, 0) - count).to(device)
        self.positions = torch.arange(self.n, device=device)
        self.fewest_negatives = self.n - int(count.max())  # known here, so no step asks the device

    def __call__(self, index, target, generator):
        device = self.order.device
        b = target.numel()
        start, count = self.start[target], self.count[target]
        n_neg = self.n - count
        negatives = None
        if self.k <= self.n:
            keys = torch.rand(b, self.n, device=device, generator=generator)
            own = (self.positions >= start[:, None]) & (self.positions < (start + count)[:, None])
            keys.masked_fill_(own, 2.0)
            picked = keys.topk(self.k, dim=1, largest=False, sorted=False).indices
            negatives = self.order[picked]
        if self.k > self.fewest_negatives:
            # some class has fewer than k negatives: those rows draw with replacement, k positions in
            # [0, n_neg) shifted past the class's block of the sorted order
            u = torch.rand(b, self.k, device=device, generator=generator)
            pos = (u * n_neg[:, None]).long().clamp_max_(n_neg[:, None] - 1)
            with_replacement = self.order[pos + count[:, None] * (pos >= start[:, None])]
            if negatives is None:
                negatives = with_replacement
            else:
                negatives = torch.where((self.k > n_neg)[:, None], with_replacement, negatives)
        if self.mode == 'exact':
            positive = index
        else:
            u = torch.rand(b, device=device, generator=generator)
            positive = self.order[start + (u * count).long().clamp_max_(count - 1)]
        return torch.cat([positive[:, None], negatives], dim=1)


def random_crop_flip(images, generator, padding=PADDING):
    """Per-image random crop (zero padding ``padding``) and horizontal flip of a batch [B, C, H, W], on its device.

    Returns (out, top, left, flip): the offsets into the padded image (0..2*padding) and the flip decisions.
    """
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(2 * padding + 1, (b,), device=device, generator=generator)
    left = torch.randint(2 * padding + 1, (b,), device=device, generator=generator)
    flip = torch.rand(b, device=device, generator=generator) < 0.5
    rows = top[:, None] + torch.arange(h, device=device)
    cols = left[:, None] + torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # one gather: out[i, ch, r, q] = padded[i, ch, rows[i, r], cols[i, q]]
    batch_index = torch.arange(b, device=device)[:, None, None, None]
    channel_index = torch.arange(c, device=device)[None, :, None, None]
    out = padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]
    return out, top, left, flip


class GPULoader:
    """An iterable of training batches from images held on ``device``.

    ``images``: uint8 [N, 3, H, W] (normalised with ``mean``/``std`` after augmentation) or float [N, 3, H, W]
    already normalised (``mean=None``). ``len(loader)`` is the number of batches per epoch on this rank; all
    ranks have the same. ``set_epoch(epoch)`` picks the epoch's order and random stream, as a sampler's does,
    so ``get_dataloaders`` returns the loader itself as the ``train_sampler``. ``dataset`` is the host data
    set the images came from (``len(loader.dataset)`` is the training set's size).
    """

    def __init__(self, images, targets, batch_size, seed, data_mode='plain', drop_last=False, world_size=1,
                 rank=0, mean=None, std=None, nce_k=16384, mode='exact', dataset=None, padding=PADDING,
                 extra_views=0):
        if data_mode not in ('plain', 'instance', 'crd'):
            raise ValueError("data_mode must be 'plain', 'instance' or 'crd', got %r" % (data_mode,))
        if int(batch_size) < 1:
            raise ValueError('batch_size must be positive')
        self.images = images
        self.device = images.device
        self.targets = torch.as_tensor(targets, dtype=torch.long).to(self.device)
        self.n = images.shape[0]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.data_mode = data_mode
        self.extra_views = int(extra_views)
        self.drop_last = drop_last
        self.world_size, self.rank = int(world_size), int(rank)
        self.padding = padding
        self.dataset = dataset
        self.epoch = 0
        if mean is not None:
            self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        else:
            self.mean = self.std = None
        self.contrast = DeviceContrastSampler(self.targets, nce_k, mode, self.device) if data_mode == 'crd' else None

    @property
    def per_replica(self):
        """Images this rank visits per epoch (the shard, padded as DistributedSampler pads it)."""
        return int(math.ceil(self.n / self.world_size))

    def __len__(self):
        if self.drop_last:
            return self.per_replica // self.batch_size
        return int(math.ceil(self.per_replica / self.batch_size))

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def indices(self):
        """This rank's image indices for the current epoch, in visiting order (on the CPU)."""
        return epoch_indices(self.n, self.seed, self.epoch, self.world_size, self.rank)

    def generator(self):
        """The device generator of this pass, seeded from (seed, epoch, rank)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(_mix_seed(self.seed, self.epoch, self.rank))
        return g

    def augment(self, images, generator):
        x, _, _, _ = random_crop_flip(images, generator, self.padding)
        if self.mean is None:
            return x.float()
        # ToTensor then Normalize, op for op, so the values match torchvision's to the bit
        return x.float().div(255).sub_(self.mean).div_(self.std)

    def __iter__(self):
        generator = self.generator()
        order = self.indices().to(self.device)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.augment(self.images[index], generator)
            y = self.targets[index]
            contrast_idx = self.contrast(index, y, generator) if self.contrast is not None else None
            views = ([self.augment(self.images[index], generator) for _ in range(self.extra_views)]
                     if self.extra_views else None)
            yield layout(self.data_mode, x, y, index, contrast_idx, views)


def run_device(opt):
    """The device ``helper.trainer.setup_device`` picked for this process (it has set the current GPU)."""
    device = getattr(opt, 'device', None)
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available() and getattr(opt, 'cpu_procs', 0) == 0:
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _train_tensors(opt, train_set):
    """(images on the host, labels, mean, std) of the training set, un-augmented."""
    if opt.dataset == 'cifar100':
        from dataset.cifar100 import MEAN, STD
        images = torch.from_numpy(train_set.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW uint8
        return images, torch.as_tensor(train_set.targets, dtype=torch.long), MEAN, STD
    images = torch.stack([train_set.image(i) for i in range(len(train_set))]).float()
    return images, torch.as_tensor(train_set.targets, dtype=torch.long), None, None


def get_gpu_dataloaders(opt, data_mode='plain', drop_last=False, extra_views=0, view_transform=None):
    """``get_dataloaders`` for ``--gpu_loader``: -> (train_loader, val_loader, train_loader, n_data)."""
    from torch.utils.data import DataLoader

    from dataset import ShardSampler, build_datasets, data_order_seed, pin_memory

    if opt.dataset not in GPU_LOADER_DATASETS:
        raise UserError('--gpu_loader holds CIFAR-sized training sets (%s) in device memory, not %s; drop '
                        '--gpu_loader (use --dali for ImageNet)' % (', '.join(GPU_LOADER_DATASETS), opt.dataset))
    if getattr(opt, 'dali', None):
        raise UserError('--gpu_loader and --dali are two different data paths; choose one')
    if extra_views and view_transform is not None:
        raise UserError('--gpu_loader draws extra views with the training augmentation only, and this method '
                        'augments them its own way; drop --gpu_loader')
    train_set, val_set = build_datasets(opt, 'plain')
    device = run_device(opt)
    seed = data_order_seed(opt)  # the same on every process, as with the standard loader
    world_size, rank = (int(opt.world_size), int(opt.rank)) if getattr(opt, 'distributed', False) else (1, 0)
    batch_size = int(opt.batch_size)

    images, targets, mean, std = _train_tensors(opt, train_set)
    train_loader = GPULoader(images.to(device), targets, batch_size, seed, data_mode=data_mode,
                             drop_last=drop_last, world_size=world_size, rank=rank, mean=mean, std=std,
                             nce_k=getattr(opt, 'nce_k', 16384), mode=getattr(opt, 'mode', 'exact'),
                             dataset=train_set, extra_views=extra_views)
    if drop_last and train_loader.per_replica < batch_size:
        raise UserError('the training set gives %d images per process, fewer than one batch of --batch_size %d '
                        '(this method drops incomplete batches); lower --batch_size'
                        % (train_loader.per_replica, batch_size))

    num_workers = int(getattr(opt, 'num_workers', 0) or 0)
    val_sampler = ShardSampler(len(val_set), world_size, rank) if world_size > 1 else None
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, sampler=val_sampler,
                            num_workers=num_workers, pin_memory=pin_memory(opt),
                            persistent_workers=num_workers > 0)
    return train_loader, val_loader, train_loader, len(train_set)
