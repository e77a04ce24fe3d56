"""The DALI ImageNet loaders (``--dali cpu``) against torchvision's ImageFolder on a tiny JPEG tree.

Tests that need DALI skip when it is not installed; the missing-DALI and bad-folder errors are tested always.
"""
import builtins
import os
import shutil
import types
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from helper.errors import UserError
from tests.fake_data import write_fake_imagefolder

# folder names whose sorted order (byte order: upper case first) is not their creation order
CLASS_NAMES = ['zebra', 'Ant', 'ant']
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def make_opt(root, batch_size=5, rank=0, world_size=1, seed=7, dali='cpu'):
    return types.SimpleNamespace(data_folder=str(root), batch_size=batch_size, num_workers=1, dali=dali, seed=seed,
                                 rank=rank, world_size=world_size)


def write_tree(root):
    """3 classes x 4 JPEGs per split; the second class has other image sizes than the rest."""
    write_fake_imagefolder(root, classes=3, per_class=4, size=(40, 48))
    for split in ('train', 'val'):
        for i, name in enumerate(CLASS_NAMES):
            os.rename(os.path.join(root, split, 'class_%d' % i), os.path.join(root, split, name))
        folder = os.path.join(root, split, CLASS_NAMES[1])
        for f in os.listdir(folder):
            path = os.path.join(folder, f)
            Image.open(path).convert('RGB').resize((64, 52)).save(path, format='JPEG')
    return str(root)


@pytest.fixture(scope='module')
def dali():
    return pytest.importorskip('nvidia.dali')


@pytest.fixture(scope='module')
def tree(dali, tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp('imagenet'))


@pytest.fixture(scope='module')
def torchvision_val(tree):
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize(MEAN, STD)])
    return datasets.ImageFolder(os.path.join(tree, 'val'), tf)


def collect(loader):
    return [(x, y) for x, y in loader]


def test_batches_have_the_torchvision_shape(tree):
    from dataset.imagenet_dali import get_dali_dataloaders
    train, val, n_data = get_dali_dataloaders(make_opt(tree))
    assert n_data == 12
    for loader in (train, val):
        for x, y in loader:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape[1:] == (3, 224, 224) and x.is_contiguous()
            assert y.shape == (x.shape[0],)
            # normalised 0-255 pixels lie in [(0 - mean) / std, (255 - mean) / std] ~ [-2.12, 2.64]
            assert -2.2 <= x.min() and x.max() <= 2.7
            # random-pixel images: every channel spreads over most of that range
            assert (x.amax(dim=(0, 2, 3)) - x.amin(dim=(0, 2, 3))).min() > 3.0


def test_val_matches_torchvision_image_folder(tree, torchvision_val):
    """Same order, labels and (nearly) pixels as ImageFolder + Resize(256) + CenterCrop(224) + Normalize."""
    from dataset.imagenet_dali import get_dali_dataloaders
    _, val, _ = get_dali_dataloaders(make_opt(tree, batch_size=12))
    (x, y), = collect(val)
    assert torchvision_val.classes == sorted(CLASS_NAMES) == ['Ant', 'ant', 'zebra']
    assert y.tolist() == [label for _, label in torchvision_val.samples]
    for i in range(len(torchvision_val)):
        ref, label = torchvision_val[i]
        diffs = (x - ref).abs().mean(dim=(1, 2, 3))
        # the image DALI gave at position i is ImageFolder's image i (random images differ by ~1 on average)
        assert int(diffs.argmin()) == i
        assert float(diffs[i]) < 0.05, (torchvision_val.samples[i], float(diffs[i]))


def test_val_smooth_image_matches_torchvision(dali, tmp_path):
    """A smooth, downscaled image: DALI's triangular resize is PIL's antialiased bilinear up to rounding."""
    from torchvision import transforms
    from dataset.imagenet_dali import get_dali_dataloaders
    yy, xx = np.mgrid[0:288, 0:320]
    pixels = np.stack([127 + 100 * np.sin(xx / 17.0), 127 + 100 * np.cos(yy / 13.0), (xx + yy) * 255.0 / 608],
                      axis=-1).astype(np.uint8)
    for split in ('train', 'val'):
        os.makedirs(tmp_path / split / 'a')
        Image.fromarray(pixels).save(tmp_path / split / 'a' / 'x.JPEG', format='JPEG', quality=95)
    _, val, _ = get_dali_dataloaders(make_opt(tmp_path, batch_size=2))
    (x, y), = collect(val)
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize(MEAN, STD)])
    ref = tf(Image.open(tmp_path / 'val' / 'a' / 'x.JPEG').convert('RGB'))
    assert y.tolist() == [0]
    assert float((x[0] - ref).abs().mean()) < 0.05


def test_val_epochs_partial_last_batch_no_reset(tree):
    from dataset.imagenet_dali import get_dali_dataloaders
    _, val, _ = get_dali_dataloaders(make_opt(tree, batch_size=5))
    assert len(val) == 3
    first = collect(val)
    second = collect(val)
    for epoch in (first, second):
        assert [x.shape[0] for x, _ in epoch] == [5, 5, 2]
        assert torch.cat([y for _, y in epoch]).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # the same images each epoch, in the same order
    assert torch.equal(torch.cat([x for x, _ in first]), torch.cat([x for x, _ in second]))
    # an epoch abandoned half way does not shift the next one
    next(iter(val))
    assert torch.equal(torch.cat([x for x, _ in collect(val)]), torch.cat([x for x, _ in first]))


def test_train_epochs_shuffled_and_complete(tree):
    from dataset.imagenet_dali import get_dali_dataloaders
    train, _, _ = get_dali_dataloaders(make_opt(tree, batch_size=5))
    assert len(train) == 3
    orders = []
    for _ in range(3):
        epoch = collect(train)
        assert [x.shape[0] for x, _ in epoch] == [5, 5, 2]
        labels = torch.cat([y for _, y in epoch]).tolist()
        assert Counter(labels) == {0: 4, 1: 4, 2: 4}
        orders.append(labels)
    assert orders[0] != sorted(orders[0]) and orders[0] != orders[1]


def test_train_drop_last(tree):
    from dataset.imagenet_dali import get_dali_dataloaders
    train, _, _ = get_dali_dataloaders(make_opt(tree, batch_size=5), drop_last=True)
    assert len(train) == 2
    for _ in range(2):
        assert [x.shape[0] for x, _ in collect(train)] == [5, 5]


def test_sharding_splits_the_data(tree):
    from dataset.imagenet_dali import get_dali_dataloaders
    _, full, _ = get_dali_dataloaders(make_opt(tree, batch_size=4))
    everything = torch.cat([x for x, _ in collect(full)])
    shards, train_labels = [], []
    for rank in range(2):
        train, val, n_data = get_dali_dataloaders(make_opt(tree, batch_size=4, rank=rank, world_size=2))
        assert n_data == 12 and len(val) == 2 and len(train) == 2
        batches = collect(val)
        assert [x.shape[0] for x, _ in batches] == [4, 2]
        shards.append(torch.cat([x for x, _ in batches]))
        train_labels += torch.cat([y for _, y in collect(train)]).tolist()
    # rank 0 takes the first half of the files, rank 1 the second: disjoint and together everything
    assert torch.equal(torch.cat(shards), everything)
    # one epoch's training shards together hold every training image's class once per image
    assert Counter(train_labels) == {0: 4, 1: 4, 2: 4}


def test_uneven_shards_keep_training_steps_equal(tree, tmp_path):
    """11 images on 2 processes with batch 5: shards of 5 and 6. Validation reads every image; training
    gives both processes one step (the lone 11th image would be a second step on one process only)."""
    from dataset.imagenet_dali import get_dali_dataloaders
    root = tmp_path / 'uneven'
    shutil.copytree(tree, root)
    for split in ('train', 'val'):
        os.remove(root / split / 'zebra' / 'img_3.jpg')
    val_sizes, train_lens = [], []
    for rank in range(2):
        train, val, n_data = get_dali_dataloaders(make_opt(root, batch_size=5, rank=rank, world_size=2))
        assert n_data == 11
        val_sizes.append([x.shape[0] for x, _ in collect(val)])
        assert len(val) == len(val_sizes[-1])
        train_lens.append(len(train))
        for _ in range(2):
            assert [x.shape[0] for x, _ in collect(train)] == [5]
    assert val_sizes == [[5], [5, 1]]
    assert train_lens == [1, 1]


def test_missing_folder_is_a_user_error(tmp_path):
    from dataset.imagenet_dali import get_dali_dataloaders
    with pytest.raises(UserError, match='not found'):
        get_dali_dataloaders(make_opt(tmp_path / 'nowhere'))
    os.makedirs(tmp_path / 'train')
    os.makedirs(tmp_path / 'val' / 'a')
    with pytest.raises(UserError, match='no class folders'):
        get_dali_dataloaders(make_opt(tmp_path))
    os.makedirs(tmp_path / 'train' / 'b')
    with pytest.raises(UserError, match='class folders differ'):
        get_dali_dataloaders(make_opt(tmp_path))


def test_folders_without_images_are_a_user_error(dali, tmp_path):
    from dataset.imagenet_dali import get_dali_dataloaders
    for split in ('train', 'val'):
        os.makedirs(tmp_path / split / 'a')
        (tmp_path / split / 'a' / 'notes.txt').write_text('not an image')
    with pytest.raises(UserError, match='no images found'):
        get_dali_dataloaders(make_opt(tmp_path))


def test_gpu_without_cuda_is_a_user_error(dali, tree, monkeypatch):
    from dataset.imagenet_dali import get_dali_dataloaders
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(UserError, match='--dali cpu'):
        get_dali_dataloaders(make_opt(tree, dali='gpu'))


def test_missing_dali_is_a_user_error(tmp_path, monkeypatch):
    """Runs without DALI too: the import is made to fail."""
    from dataset.imagenet_dali import get_dali_dataloaders
    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith('nvidia.dali') or name == 'nvidia':
            raise ImportError('No module named ' + repr(name))
        return real_import(name, *args, **kwargs)

    for split in ('train', 'val'):
        os.makedirs(tmp_path / split / 'a')
    monkeypatch.setattr(builtins, '__import__', no_dali)
    with pytest.raises(UserError, match='nvidia-dali-cuda') as err:
        get_dali_dataloaders(make_opt(tmp_path))
    assert '\n' not in str(err.value)
