"""CIFAR-100 from torchvision's on-disk format, ``<data_folder>/cifar-100-python/{train,test,meta}``.

We read the files ourselves instead of using ``torchvision.datasets.CIFAR100``: torchvision checks each file's
MD5 on every load, which rejects re-packed copies and small test files. Here a file is accepted for its
structure (a pickled dict with ``data`` [N, 3072] uint8 and ``fine_labels`` in 0..99); checksums are checked
only when we download the archive.

``CIFAR100`` gives ``(img, target)``; the sample indices and CRD's contrast indices that RepDistiller's
``CIFAR100Instance``/``CIFAR100InstanceSample`` add come from ``dataset.wrappers.MethodData``, for every data set.
"""
import os
import pickle

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.utils import download_and_extract_archive

from helper.errors import UserError

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)

URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'
ARCHIVE = 'cifar-100-python.tar.gz'
ARCHIVE_MD5 = 'eb9058c3a382ffc7106e4002c42a8d85'
FOLDER = 'cifar-100-python'
NUM_CLASSES = 100


def train_transform():
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def test_transform():
    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def _split_path(root, train):
    return os.path.join(str(root), FOLDER, 'train' if train else 'test')


def ensure_downloaded(root):
    """Download and extract the official archive unless both splits are already under ``root``."""
    if all(os.path.isfile(_split_path(root, train)) for train in (True, False)):
        return
    folder = os.path.join(str(root), FOLDER)
    try:
        download_and_extract_archive(URL, download_root=str(root), filename=ARCHIVE, md5=ARCHIVE_MD5)
    except Exception as err:  # no network, a proxy page, a bad checksum: the fix is the same
        raise UserError('CIFAR-100 is not in %s and could not be downloaded (%s: %s); download %s and '
                        'extract it so that %s holds train, test and meta'
                        % (folder, type(err).__name__, str(err).splitlines()[0] if str(err) else '', URL,
                           folder)) from err
    for train in (True, False):
        if not os.path.isfile(_split_path(root, train)):
            raise UserError('%s is missing after extracting %s; download %s again and extract it into %s'
                            % (_split_path(root, train), ARCHIVE, URL, root))


def _str_keys(obj):
    # Python-2 pickles give str keys with encoding='latin1', but a copy re-pickled by hand may hold bytes keys.
    if not isinstance(obj, dict):
        return None
    return {(k.decode('latin1') if isinstance(k, bytes) else k): v for k, v in obj.items()}


def load_split(path):
    """Read one CIFAR-100 split file -> (images uint8 [N, 32, 32, 3], labels int64 [N])."""
    redownload = 'delete it and download %s again' % URL
    try:
        with open(path, 'rb') as f:
            entry = _str_keys(pickle.load(f, encoding='latin1'))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, MemoryError, UnicodeDecodeError) as err:
        raise UserError('%s is truncated or not a CIFAR-100 pickle (%s); %s'
                        % (path, type(err).__name__, redownload)) from err
    if entry is None or 'data' not in entry or 'fine_labels' not in entry:
        raise UserError("%s is not a CIFAR-100 split: expected a pickled dict with 'data' and 'fine_labels'; %s"
                        % (path, redownload))
    data = np.asarray(entry['data'])
    labels = np.asarray(entry['fine_labels'])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise UserError("%s: 'data' must be a uint8 array of shape [N, 3072], found %s of shape %s; %s"
                        % (path, data.dtype, tuple(data.shape), redownload))
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError("%s: 'fine_labels' must be %d integers (one per image), found %s of shape %s; %s"
                        % (path, len(data), labels.dtype, tuple(labels.shape), redownload))
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise UserError("%s: 'fine_labels' must lie in 0..%d, found %d..%d; %s"
                        % (path, NUM_CLASSES - 1, labels.min(), labels.max(), redownload))
    # rows hold the red, green and blue planes one after the other; PIL wants height x width x channel
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)


def load_class_names(root):
    path = os.path.join(str(root), FOLDER, 'meta')
    if not os.path.isfile(path):
        return [str(i) for i in range(NUM_CLASSES)]
    try:
        with open(path, 'rb') as f:
            meta = _str_keys(pickle.load(f, encoding='latin1'))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, MemoryError, UnicodeDecodeError) as err:
        raise UserError('%s is truncated or not a CIFAR-100 pickle (%s); delete it and download %s again'
                        % (path, type(err).__name__, URL)) from err
    names = (meta or {}).get('fine_label_names')
    if names is None or len(names) != NUM_CLASSES:
        raise UserError("%s: expected 'fine_label_names' with %d names; delete it and download %s again"
                        % (path, NUM_CLASSES, URL))
    return [n.decode('latin1') if isinstance(n, bytes) else str(n) for n in names]


class CIFAR100(Dataset):
    """CIFAR-100 split held in memory as uint8 [N, 32, 32, 3]; items are ``(transform(PIL image), label)``."""

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        self.root = str(root)
        self.train = train
        self.transform = transform
        self.target_transform = target_transform
        if download:
            ensure_downloaded(root)
        path = _split_path(root, train)
        if not os.path.isfile(path):
            raise UserError('%s not found; download %s and extract it into %s' % (path, URL, root))
        self.data, labels = load_split(path)
        self.targets = labels.tolist()
        self.classes = load_class_names(root)

    def __len__(self):
        return len(self.data)

    def _load(self, index):
        img, target = Image.fromarray(self.data[index]), self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __getitem__(self, index):
        return self._load(index)


def build_datasets(opt):
    """-> (train_set, val_set) for ``get_dataloaders``."""
    root = getattr(opt, 'data_folder', None) or './data'
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # one download: processes writing the same archive at once would corrupt it
        if dist.get_rank() == 0:
            ensure_downloaded(root)
        dist.barrier()
    ensure_downloaded(root)
    train_set = CIFAR100(root, train=True, transform=train_transform())
    val_set = CIFAR100(root, train=False, transform=test_transform())
    return train_set, val_set
