"""ImageNet through NVIDIA DALI (``--dali cpu|gpu``): JPEG decoding and augmentation in DALI's own threads,
on the GPU with ``--dali gpu``.

The loaders behave like the torchvision ImageFolder loaders, so the training loop needs no DALI branch: each
yields ``(x, y)`` with ``x`` float32 ``[B, 3, 224, 224]`` (normalised, NCHW) and ``y`` int64 ``[B]``;
``len(loader)`` is the number of batches this process sees per epoch; iterating again starts the next epoch
(no manual ``reset()``, which the reference's loop had to call). Labels agree with ImageFolder's: DALI's file
reader, like ImageFolder, numbers the class folders in sorted order.

Pipelines, as in the reference (NVIDIA's ResNet-50 example):
  train  fused decode + random crop (area 0.1-1.0, aspect ratio 0.8-1.25, 100 attempts), resize to 224x224
         (triangular filter), random horizontal flip, normalise. Each epoch the reader draws a new
         permutation of the whole training set (the same on every process) and each process reads its slice.
  val    decode, resize the shorter side to 256 (triangular filter), centre crop 224, normalise; file order.
Differences from the reference:
  - ``--dali cpu`` runs everything on the CPU (the reference still decoded the validation images and
    normalised on the GPU), so it also works on machines without one.
  - The last training batch is partial (the reference filled it with copies of the shard's last image), as
    the torchvision loader does; with ``drop_last`` (SemCKD) only full batches are used.
  - Every process runs the same number of training steps, also when the shards' sizes differ by one and that
    would give one process an extra batch of a single image; that image is then left out for this epoch.
    Without this, distributed training would hang on its last step.
"""
import math
import os

from helper.errors import UserError

CROP = 224
VAL_RESIZE = 256
# ImageNet mean and std in 0-255 units: DALI normalises the decoded uint8 pixels directly
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
READER = 'Reader'
# nvJPEG buffer sizes that fit every full-size ImageNet image, so the GPU decoder never reallocates (reference)
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512


def _import_dali():
    """DALI's modules, imported only when a DALI loader is built (it is optional and large)."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali.pipeline import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError:
        raise UserError('--dali needs NVIDIA DALI, which is not installed: pip install nvidia-dali-cuda130 '
                        '(CUDA 13) or nvidia-dali-cuda120 (CUDA 12), matching your CUDA version') from None
    return fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy


def _class_folders(folder):
    """Sorted class folder names in ``folder``; UserError if it is missing or has none."""
    if not os.path.isdir(folder):
        raise UserError('ImageNet folder not found: {} (expected <data_folder>/train/<class>/*.JPEG and '
                        '<data_folder>/val/<class>/*.JPEG; set --data_folder)'.format(folder))
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise UserError('no class folders in {} (expected {}/<class>/*.JPEG)'.format(folder, folder))
    return classes


def _shard_sizes(n, world_size):
    """Images per process: DALI's reader gives process r the images [n*r//world, n*(r+1)//world)."""
    return [n * (r + 1) // world_size - n * r // world_size for r in range(world_size)]


def _pipeline(dali, folder, train, opt, device_id):
    fn, types, pipeline_def, _, _ = dali
    gpu = opt.dali == 'gpu'
    rank, world_size = opt.rank, opt.world_size
    # different augmentation on each process; DALI picks a seed itself when none is given
    seed = None if opt.seed is None else opt.seed + rank

    @pipeline_def(batch_size=opt.batch_size, num_threads=max(1, opt.num_workers), device_id=device_id, seed=seed)
    def pipe():
        # pad_last_batch: the reader pads its shard's last batch with copies instead of reading on into the
        # next epoch, so every epoch starts at the shard's start; the iterator drops the copies again.
        if train:
            # a fresh permutation of the whole set each epoch, identical on every process so the shards
            # stay disjoint (the shuffle seed must be the same everywhere: opt.seed, not opt.seed + rank)
            order = {} if opt.seed is None else {'shuffle_after_epoch_seed': opt.seed}
            jpegs, labels = fn.readers.file(file_root=folder, shard_id=rank, num_shards=world_size,
                                            shuffle_after_epoch=True, pad_last_batch=True, name=READER, **order)
        else:
            jpegs, labels = fn.readers.file(file_root=folder, shard_id=rank, num_shards=world_size,
                                            random_shuffle=False, stick_to_shard=True, pad_last_batch=True,
                                            name=READER)
        decoder = {'device': 'mixed', 'device_memory_padding': DEVICE_MEMORY_PADDING,
                   'host_memory_padding': HOST_MEMORY_PADDING} if gpu else {'device': 'cpu'}
        if train:
            # decoding only the random crop's region is cheaper than decoding the whole image first
            images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_aspect_ratio=[0.8, 1.25],
                                                   random_area=[0.1, 1.0], num_attempts=100, **decoder)
            images = fn.resize(images, resize_x=CROP, resize_y=CROP, interp_type=types.INTERP_TRIANGULAR)
            flip = {'mirror': fn.random.coin_flip(probability=0.5)}
        else:
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
            images = fn.resize(images, resize_shorter=VAL_RESIZE, interp_type=types.INTERP_TRIANGULAR)
            flip = {}
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout='CHW', crop=(CROP, CROP),
                                          mean=MEAN, std=STD, **flip)
        if gpu:
            labels = labels.gpu()
        return images, labels

    pipeline = pipe()
    try:
        pipeline.build()
    except RuntimeError as err:
        if 'No files found' in str(err):
            raise UserError('no images found in the class folders of {} (expected {}/<class>/*.JPEG)'.format(
                folder, folder)) from None
        raise
    return pipeline


class DaliLoader:
    """A DALI iterator dressed as a DataLoader: ``(x, y)`` batches, ``len()``, a new epoch per ``iter()``.

    ``steps`` caps the batches yielded per epoch; the rest of DALI's epoch (batches emptied of padding, the
    short last batch under ``drop_last``) is read and dropped, so the next epoch starts at its beginning. An
    epoch left unfinished (the caller stopped early) is likewise read to its end before the next one starts.
    """

    def __init__(self, dali_iterator, steps, batch_size, num_samples, drop_last):
        self._dali = dali_iterator
        self._steps = steps
        self._drop_last = drop_last
        self._epoch_open = False
        self.batch_size = batch_size
        self.num_samples = num_samples  # images this process reads per epoch
        self.sampler = None  # sharding happens in DALI's reader; nothing for the loop to set per epoch

    def __len__(self):
        return self._steps

    def _next(self):
        out = self._dali.__next__()[0]
        # labels come as int32 of shape [B, 1]; cross-entropy wants int64 [B]
        return out['data'], out['label'].reshape(-1).long()

    def _finish_epoch(self):
        # DALI resets itself (auto_reset) when it raises StopIteration at the end of the epoch
        try:
            while True:
                self._dali.__next__()
        except StopIteration:
            pass
        self._epoch_open = False

    def __iter__(self):
        if self._epoch_open:
            self._finish_epoch()
        self._epoch_open = True
        yielded = 0
        while yielded < self._steps:
            try:
                x, y = self._next()
            except StopIteration:
                self._epoch_open = False
                return
            if x.shape[0] == 0 or (self._drop_last and x.shape[0] < self.batch_size):
                continue
            yielded += 1
            yield x, y
        self._finish_epoch()


def _loader(dali, folder, train, opt, device_id, drop_last):
    _, _, _, DALIGenericIterator, LastBatchPolicy = dali
    pipeline = _pipeline(dali, folder, train, opt, device_id)
    n = pipeline.reader_meta(READER)['epoch_size']
    sizes = _shard_sizes(n, opt.world_size)
    batch = opt.batch_size
    if train:
        # the same step count on every process, or distributed training waits forever on the last step
        steps = min(s // batch if drop_last else math.ceil(s / batch) for s in sizes)
        if steps == 0:
            raise UserError('{} training images give {} per process, fewer than --batch_size {}; lower '
                            '--batch_size'.format(n, min(sizes), batch))
    else:
        steps = math.ceil(sizes[opt.rank] / batch)
    iterator = DALIGenericIterator([pipeline], ['data', 'label'], reader_name=READER,
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
    return DaliLoader(iterator, steps, batch, sizes[opt.rank], drop_last and train), n


def get_dali_dataloaders(opt, drop_last=False):
    """-> (train_loader, val_loader, n_data) for ``opt.dali`` in ('cpu', 'gpu').

    Reads ``opt.data_folder`` (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``, there or in
    ``<data_folder>/<dataset>/`` as for the torchvision loaders), ``batch_size`` (per
    process), ``num_workers`` (DALI threads), ``dali``, ``seed`` (None: random), ``rank`` and ``world_size``
    (one shard of the data per process). ``n_data`` is the number of training images (all shards).
    ``drop_last`` drops the short last training batch (SemCKD needs full batches).
    """
    if opt.dali not in ('cpu', 'gpu'):
        raise UserError("--dali must be 'cpu' or 'gpu', got {!r}".format(opt.dali))
    from dataset.imagenet import find_root
    root = find_root(opt.data_folder, getattr(opt, 'dataset', 'imagenet'))
    train_folder = os.path.join(root, 'train')
    val_folder = os.path.join(root, 'val')
    train_classes = _class_folders(train_folder)
    val_classes = _class_folders(val_folder)
    if train_classes != val_classes:
        # labels are folder positions, so a folder missing on one side would shift every later label
        missing = sorted(set(train_classes).symmetric_difference(val_classes))
        raise UserError('train and val class folders differ in {} (e.g. {}); both need the same classes'.format(
            root, ', '.join(missing[:3])))
    dali = _import_dali()
    device_id = None  # CPU-only pipelines take no device
    if opt.dali == 'gpu':
        import torch
        if not torch.cuda.is_available():
            raise UserError('--dali gpu needs a CUDA GPU; use --dali cpu')
        device_id = torch.cuda.current_device()
    train_loader, n_data = _loader(dali, train_folder, True, opt, device_id, drop_last)
    val_loader, _ = _loader(dali, val_folder, False, opt, device_id, False)
    return train_loader, val_loader, n_data
