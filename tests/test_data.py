"""The data sets and loaders, run on tiny files written like the real ones (tests/fake_data.py)."""
import os
import pickle
import pickletools
import sys
from argparse import Namespace
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_data import py2_pickle_bytes, write_fake_cifar100, write_fake_imagefolder  # noqa: E402

import dataset  # noqa: E402
from dataset import cifar100, synthetic  # noqa: E402
from dataset.wrappers import ContrastSampler  # noqa: E402
from helper.errors import UserError  # noqa: E402

CIFAR_MEAN = torch.tensor([0.5071, 0.4867, 0.4408]).view(3, 1, 1)
CIFAR_STD = torch.tensor([0.2675, 0.2565, 0.2761]).view(3, 1, 1)


def make_opt(**kw):
    base = dict(dataset='cifar100', data_folder='./data', batch_size=8, num_workers=0, nce_k=16,
                mode='exact', seed=0, distributed=False, world_size=1, rank=0)
    base.update(kw)
    return Namespace(**base)


def raw_to_chw(raw_row):
    """One row of the CIFAR file ([3072] uint8) -> float CHW in 0..1, computed without the loader."""
    return torch.from_numpy(raw_row.reshape(3, 32, 32).astype(np.float32) / 255.0)


def crop_flip_candidates(img, padding=4):
    """Every random crop (padding ``padding``, zero fill) and flip of a CHW image: [2 * (2p+1)^2, C, H, W]."""
    _, h, w = img.shape
    padded = F.pad(img, (padding,) * 4)
    crops = [padded[:, t:t + h, l:l + w] for t in range(2 * padding + 1) for l in range(2 * padding + 1)]
    crops = torch.stack(crops)
    return torch.cat([crops, crops.flip(-1)])


def match_candidate(x, candidates, atol=1e-5):
    """Position of ``x`` among ``candidates``, or -1."""
    hit = ((candidates - x).abs().flatten(1).amax(1) <= atol).nonzero().flatten()
    return int(hit[0]) if len(hit) else -1


@pytest.fixture(scope='module')
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar')
    written = write_fake_cifar100(root, n_train=64, n_test=40, seed=3)
    return root, written


# ---------------------------------------------------------------- the fake files are like the official ones

def test_fake_cifar_is_a_python2_pickle(cifar_root):
    root, written = cifar_root
    path = os.path.join(root, 'cifar-100-python', 'train')
    with open(path, 'rb') as f:
        as_bytes = pickle.load(f, encoding='bytes')
    with open(path, 'rb') as f:
        as_latin1 = pickle.load(f, encoding='latin1')
    assert b'data' in as_bytes and b'fine_labels' in as_bytes
    assert 'data' in as_latin1 and 'fine_labels' in as_latin1
    assert as_latin1['data'].dtype == np.uint8 and as_latin1['data'].shape == (64, 3072)
    assert isinstance(as_latin1['fine_labels'], list)
    np.testing.assert_array_equal(as_bytes[b'data'], written['train'][0])
    # Python 2 strings, not Python 3 unicode
    with open(path, 'rb') as f:
        ops = {op.name for op, _, _ in pickletools.genops(f.read())}
    assert 'SHORT_BINSTRING' in ops and 'BINUNICODE' not in ops


# ---------------------------------------------------------------- CIFAR-100

def test_cifar_loaders_shapes_order_and_normalisation(cifar_root):
    root, written = cifar_root
    opt = make_opt(data_folder=str(root))
    train_loader, val_loader, sampler, n_data = dataset.get_dataloaders(opt)
    assert isinstance(sampler, torch.utils.data.DistributedSampler) and sampler.num_replicas == 1
    assert n_data == 64
    x, y = next(iter(train_loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, ys = zip(*val_loader)
    xs, ys = torch.cat(xs), torch.cat(ys)
    raw, labels = written['test']
    assert xs.shape == (40, 3, 32, 32)
    assert ys.tolist() == labels  # val keeps the file's order
    assert 0 <= ys.min() and ys.max() <= 99
    # per-channel mean of the normalised val set, against the raw pixels normalised by hand
    pixel_mean = raw.reshape(40, 3, 1024).astype(np.float64).mean(axis=(0, 2))
    expected = (pixel_mean / 255.0 - CIFAR_MEAN.flatten().double().numpy()) / CIFAR_STD.flatten().double().numpy()
    np.testing.assert_allclose(xs.double().mean(dim=(0, 2, 3)).numpy(), expected, atol=1e-5)
    # and image by image (the planes of a row are red, green, blue)
    expected_imgs = torch.stack([(raw_to_chw(r) - CIFAR_MEAN) / CIFAR_STD for r in raw])
    torch.testing.assert_close(xs, expected_imgs, atol=1e-5, rtol=0)


def test_cifar_train_augmentation_is_crop_and_flip(cifar_root):
    root, written = cifar_root
    train_set, _ = cifar100.build_datasets(make_opt(data_folder=str(root)))
    raw, labels = written['train']
    base = (raw_to_chw(raw[5]) - CIFAR_MEAN) / CIFAR_STD
    # RandomCrop pads with black pixels, which normalise to -mean/std
    candidates = crop_flip_candidates(base * CIFAR_STD + CIFAR_MEAN)
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        x, y = train_set[5]
        assert y == labels[5]
        k = match_candidate(x * CIFAR_STD + CIFAR_MEAN, candidates)
        assert k >= 0, 'a training image is not a padded crop (or its mirror) of the stored image'
        seen.add(k)
    assert len(seen) > 5
    assert any(k >= len(candidates) // 2 for k in seen) and any(k < len(candidates) // 2 for k in seen)


def test_cifar_instance_indices_are_dataset_indices(cifar_root):
    root, written = cifar_root
    raw, labels = written['train']
    train_loader, val_loader, _, _ = dataset.get_dataloaders(make_opt(data_folder=str(root)), 'instance')
    seen = []
    for x, y, index in train_loader:
        assert index.dtype == torch.int64
        assert y.tolist() == [labels[i] for i in index.tolist()]
        for img, i in zip(x[:2], index[:2].tolist()):
            cands = crop_flip_candidates(raw_to_chw(raw[i]))
            assert match_candidate(img * CIFAR_STD + CIFAR_MEAN, cands) >= 0
        seen += index.tolist()
    assert sorted(seen) == list(range(64))
    assert seen != list(range(64))  # shuffled
    assert len(next(iter(val_loader))) == 2


def test_cifar_crd_batches(cifar_root):
    root, written = cifar_root
    labels = np.array(written['train'][1])
    opt = make_opt(data_folder=str(root), nce_k=20)
    train_loader, val_loader, _, n_data = dataset.get_dataloaders(opt, 'crd')
    x, y, index, contrast = next(iter(train_loader))
    assert contrast.shape == (8, 21) and contrast.dtype == torch.int64
    assert torch.equal(contrast[:, 0], index)
    neg = contrast[:, 1:].numpy()
    assert neg.min() >= 0 and neg.max() < n_data
    assert (labels[neg] != y.numpy()[:, None]).all()
    # 20 negatives out of 63 or more: drawn without replacement, as the reference does
    assert all(len(set(row)) == 20 for row in neg.tolist())
    assert len(next(iter(val_loader))) == 2


def test_cifar_crd_relax_positive_is_same_class(cifar_root):
    root, written = cifar_root
    labels = np.array(written['train'][1])
    train_loader, _, _, _ = dataset.get_dataloaders(make_opt(data_folder=str(root), mode='relax'), 'crd')
    _, y, index, contrast = next(iter(train_loader))
    assert (labels[contrast[:, 0].numpy()] == y.numpy()).all()
    assert (labels[contrast[:, 1:].numpy()] != y.numpy()[:, None]).all()


def test_contrast_sampler_unbalanced_classes():
    # class 0: 50 samples, class 1: 3, class 2: 1, class 7: 10 (classes 3..6 empty), in mixed order
    labels = np.array([0] * 50 + [1] * 3 + [2] + [7] * 10)
    labels = labels[np.random.RandomState(0).permutation(len(labels))]
    torch.manual_seed(0)
    for c in (0, 1, 2, 7):
        n_neg = int((labels != c).sum())
        own = int(np.flatnonzero(labels == c)[0])
        # k equal to the number of negatives, without replacement: exactly every other-class sample once
        row = ContrastSampler(labels, k=n_neg)(own, c)
        assert row[0] == own
        assert sorted(row[1:].tolist()) == np.flatnonzero(labels != c).tolist()
        # more negatives than exist: drawn with replacement, still never from the own class
        row = ContrastSampler(labels, k=3 * n_neg)(own, c)
        assert len(row) == 3 * n_neg + 1 and (labels[row[1:].numpy()] != c).all()
        # relax: the positive is from the class
        row = ContrastSampler(labels, k=5, mode='relax')(own, c)
        assert labels[int(row[0])] == c
    # always with replacement (the ImageFolder variant)
    row = ContrastSampler(labels, k=500, replace=True)(0, int(labels[0]))
    assert (labels[row[1:].numpy()] != labels[0]).all()


def test_cifar_crd_with_unbalanced_file(tmp_path):
    train_labels = [0] * 30 + [1] * 5 + [2] * 1 + [99] * 12
    write_fake_cifar100(tmp_path, n_train=len(train_labels), n_test=10, train_labels=train_labels)
    opt = make_opt(data_folder=str(tmp_path), nce_k=40, batch_size=16)
    train_loader, _, _, n_data = dataset.get_dataloaders(opt, 'crd')
    assert n_data == 48
    labels = np.array(train_labels)
    for _, y, index, contrast in train_loader:
        assert (labels[contrast[:, 1:].numpy()] != y.numpy()[:, None]).all()
        assert torch.equal(contrast[:, 0], index)


def test_cifar_accepts_bytes_keys_and_str_keys(tmp_path):
    write_fake_cifar100(tmp_path, n_train=10, n_test=10)
    path = os.path.join(tmp_path, 'cifar-100-python', 'train')
    rng = np.random.RandomState(1)
    data = rng.randint(0, 256, (6, 3072)).astype(np.uint8)
    with open(path, 'wb') as f:  # a Python 3 re-pack with bytes keys
        pickle.dump({b'data': data, b'fine_labels': [1, 2, 3, 4, 5, 6]}, f)
    images, labels = cifar100.load_split(path)
    assert images.shape == (6, 32, 32, 3) and labels.tolist() == [1, 2, 3, 4, 5, 6]
    assert np.array_equal(images[2].transpose(2, 0, 1).reshape(-1), data[2])
    with open(path, 'wb') as f:  # and one with str keys
        pickle.dump({'data': data, 'fine_labels': [0] * 6}, f)
    assert cifar100.load_split(path)[1].tolist() == [0] * 6


def test_truncated_or_malformed_cifar_file_names_the_file(tmp_path):
    write_fake_cifar100(tmp_path, n_train=20, n_test=10)
    path = os.path.join(tmp_path, 'cifar-100-python', 'train')
    with open(path, 'rb') as f:
        raw = f.read()
    with open(path, 'wb') as f:
        f.write(raw[:len(raw) // 2])
    with pytest.raises(UserError, match='download') as err:
        dataset.get_dataloaders(make_opt(data_folder=str(tmp_path)))
    assert path in str(err.value) and '\n' not in str(err.value)

    bad = [
        {'data': np.zeros((4, 3000), np.uint8), 'fine_labels': [0] * 4},     # wrong width
        {'data': np.zeros((4, 3072), np.float32), 'fine_labels': [0] * 4},   # wrong dtype
        {'data': np.zeros((4, 3072), np.uint8), 'fine_labels': [0, 1, 2]},   # label count
        {'data': np.zeros((4, 3072), np.uint8), 'fine_labels': [0, 1, 2, 100]},  # label range
        {'data': np.zeros((4, 3072), np.uint8), 'labels': [0] * 4},           # CIFAR-10, not 100
        [1, 2, 3],
    ]
    for obj in bad:
        with open(path, 'wb') as f:
            f.write(py2_pickle_bytes(obj))
        with pytest.raises(UserError) as err:
            cifar100.load_split(path)
        assert path in str(err.value)


def test_missing_cifar_without_network(tmp_path, monkeypatch):
    calls = []

    def no_network(url, **kwargs):
        calls.append(url)
        raise URLError('[Errno -3] Temporary failure in name resolution')

    monkeypatch.setattr(cifar100, 'download_and_extract_archive', no_network)
    with pytest.raises(UserError) as err:
        dataset.get_dataloaders(make_opt(data_folder=str(tmp_path / 'nowhere')))
    msg = str(err.value)
    assert calls == [cifar100.URL]
    assert cifar100.URL in msg and os.path.join(str(tmp_path / 'nowhere'), 'cifar-100-python') in msg
    assert '\n' not in msg


def test_download_is_skipped_when_files_exist(cifar_root, monkeypatch):
    root, _ = cifar_root

    def fail(*args, **kwargs):
        raise AssertionError('must not download')

    monkeypatch.setattr(cifar100, 'download_and_extract_archive', fail)
    train_set, val_set = cifar100.build_datasets(make_opt(data_folder=str(root)))
    assert len(train_set) == 64 and len(val_set) == 40
    assert train_set.classes[3] == 'class_03'


def test_drop_last_and_seed(cifar_root):
    root, _ = cifar_root
    opt = make_opt(data_folder=str(root), batch_size=10)
    train_loader, val_loader, _, _ = dataset.get_dataloaders(opt, 'instance', drop_last=True)
    assert len(train_loader) == 6 and all(len(b[0]) == 10 for b in train_loader)
    assert sum(len(b[0]) for b in val_loader) == 40  # val keeps its last partial batch
    first = [next(iter(dataset.get_dataloaders(opt, 'instance')[0]))[2] for _ in range(2)]
    assert torch.equal(first[0], first[1])  # same --seed, same order
    other = next(iter(dataset.get_dataloaders(make_opt(data_folder=str(root), batch_size=10, seed=1),
                                              'instance')[0]))[2]
    assert not torch.equal(first[0], other)
    with pytest.raises(UserError, match='batch_size'):
        dataset.get_dataloaders(make_opt(data_folder=str(root), batch_size=100), drop_last=True)


def test_distributed_shards_are_disjoint(cifar_root):
    root, _ = cifar_root
    shards, val_shards = [], []
    for rank in (0, 1):
        opt = make_opt(data_folder=str(root), distributed=True, world_size=2, rank=rank)
        train_loader, val_loader, sampler, n_data = dataset.get_dataloaders(opt, 'instance')
        assert isinstance(sampler, torch.utils.data.DistributedSampler) and n_data == 64
        sampler.set_epoch(0)
        shards.append([i for _, _, idx in train_loader for i in idx.tolist()])
        val_shards.append(list(iter(val_loader.sampler)))
        sampler.set_epoch(1)
        assert [i for _, _, idx in train_loader for i in idx.tolist()] != shards[-1]
    assert len(shards[0]) == len(shards[1]) == 32
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(64))
    assert not set(val_shards[0]) & set(val_shards[1])
    # validation shards are not padded: every image is counted exactly once across processes
    assert sorted(val_shards[0] + val_shards[1]) == list(range(40))
    assert val_shards[0] == sorted(val_shards[0])  # not shuffled


def test_epoch_order_depends_only_on_seed_and_epoch(cifar_root):
    # a resumed run rebuilds its loader and must see the order of the epoch it resumes at
    root, _ = cifar_root
    orders = []
    for _ in range(2):
        loader, _, sampler, _ = dataset.get_dataloaders(make_opt(data_folder=str(root)), 'instance')
        epochs = []
        for epoch in (1, 2, 3):
            sampler.set_epoch(epoch)
            epochs.append([i for _, _, idx in loader for i in idx.tolist()])
        orders.append(epochs)
    assert orders[0] == orders[1]
    assert orders[0][0] != orders[0][1]
    fresh, _, sampler, _ = dataset.get_dataloaders(make_opt(data_folder=str(root)), 'instance')
    sampler.set_epoch(3)
    assert [i for _, _, idx in fresh for i in idx.tolist()] == orders[0][2]


def test_worker_processes(cifar_root):
    root, written = cifar_root
    opt = make_opt(data_folder=str(root), num_workers=1, nce_k=8)
    train_loader, val_loader, _, _ = dataset.get_dataloaders(opt, 'crd')
    # fresh training workers each epoch (exact resume), persistent validation workers
    assert not train_loader.persistent_workers and train_loader.num_workers == 1
    assert val_loader.persistent_workers
    _, y, index, contrast = next(iter(train_loader))
    labels = np.array(written['train'][1])
    assert torch.equal(contrast[:, 0], index) and (labels[contrast[:, 1:].numpy()] != y.numpy()[:, None]).all()


# ---------------------------------------------------------------- ImageFolder (ImageNet layout)

@pytest.fixture(scope='module')
def imagenette_root(tmp_path_factory):
    data = tmp_path_factory.mktemp('inet')
    write_fake_imagefolder(data / 'imagenette', classes=3, per_class=4, size=(40, 48))
    return data


def test_imagefolder_loaders(imagenette_root):
    opt = make_opt(dataset='imagenette', data_folder=str(imagenette_root), batch_size=4)
    train_loader, val_loader, sampler, n_data = dataset.get_dataloaders(opt)
    assert len(sampler) == 12 and n_data == 12
    x, y = next(iter(train_loader))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    vals = [b for b in val_loader]
    assert all(len(b) == 2 for b in vals)
    assert torch.cat([b[1] for b in vals]).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert dataset.image_size('imagenette') == 224 and dataset.NUM_CLASSES['imagenette'] == 10


def test_imagefolder_instance_and_crd(imagenette_root):
    opt = make_opt(dataset='imagenette', data_folder=str(imagenette_root), batch_size=6, nce_k=10)
    train_loader, _, _, _ = dataset.get_dataloaders(opt, 'instance')
    _, y, index = next(iter(train_loader))
    assert y.tolist() == [i // 4 for i in index.tolist()]
    train_loader, _, _, _ = dataset.get_dataloaders(opt, 'crd')
    x, y, index, contrast = next(iter(train_loader))
    assert contrast.shape == (6, 11) and torch.equal(contrast[:, 0], index)
    assert ((contrast[:, 1:] // 4) != y[:, None]).all()


def test_imagefolder_flat_layout(tmp_path):
    write_fake_imagefolder(tmp_path, classes=2, per_class=2)
    opt = make_opt(dataset='imagenet', data_folder=str(tmp_path), batch_size=2)
    _, _, _, n_data = dataset.get_dataloaders(opt)
    assert n_data == 4


def test_imagefolder_errors(tmp_path):
    opt = make_opt(dataset='imagenet', data_folder=str(tmp_path), batch_size=2)
    with pytest.raises(UserError) as err:
        dataset.get_dataloaders(opt)
    assert os.path.join(str(tmp_path), 'imagenet') in str(err.value)
    # class folders without images
    for split in ('train', 'val'):
        os.makedirs(tmp_path / 'imagenet' / split / 'n01440764')
    with pytest.raises(UserError) as err:
        dataset.get_dataloaders(opt)
    assert os.path.join(str(tmp_path), 'imagenet', 'train') in str(err.value) and '\n' not in str(err.value)
    # train with images, val missing
    for split in ('train', 'val'):
        os.rmdir(tmp_path / 'imagenet' / split / 'n01440764')
    os.rmdir(tmp_path / 'imagenet' / 'val')
    write_fake_imagefolder(tmp_path / 'imagenet', classes=1, per_class=1, splits=('train',))
    with pytest.raises(UserError) as err:
        dataset.get_dataloaders(opt)
    assert os.path.join(str(tmp_path), 'imagenet', 'val') in str(err.value)


def test_imagefolder_class_mismatch(tmp_path):
    write_fake_imagefolder(tmp_path, classes=2, per_class=1, splits=('train',))
    write_fake_imagefolder(tmp_path, classes=3, per_class=1, splits=('val',))
    with pytest.raises(UserError, match='same class folders'):
        dataset.get_dataloaders(make_opt(dataset='imagenette', data_folder=str(tmp_path), batch_size=2))


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_and_normalised():
    a = synthetic.SyntheticImages(300, train=False)
    torch.manual_seed(123)  # the global seed (--seed) must not matter
    b = synthetic.SyntheticImages(300, train=False)
    assert a.targets == b.targets
    xa = torch.stack([a[i][0] for i in range(300)])
    assert torch.equal(xa, torch.stack([b[i][0] for i in range(300)]))
    assert xa.shape == (300, 3, 32, 32) and xa.dtype == torch.float32
    assert abs(xa.mean().item()) < 0.1 and abs(xa.std().item() - 1) < 0.1
    assert sorted(set(a.targets)) == list(range(100))
    train = synthetic.SyntheticImages(300, train=True)
    assert not torch.equal(train.image(0), a.image(0))  # train and val are different images
    assert not torch.equal(synthetic.SyntheticImages(300, train=False, seed=1).image(0), a.image(0))


def test_synthetic_train_augmentation():
    train = synthetic.SyntheticImages(20, train=True)
    candidates = crop_flip_candidates(train.image(3))
    seen = {match_candidate(train[3][0], candidates) for _ in range(20)}
    assert -1 not in seen and len(seen) > 3


def test_synthetic_loaders_all_modes():
    opt = make_opt(dataset='synthetic', synthetic_train_size=40, synthetic_val_size=24, nce_k=12)
    train_loader, val_loader, _, n_data = dataset.get_dataloaders(opt)
    assert n_data == 40 and sum(len(b[0]) for b in val_loader) == 24
    x, y = next(iter(train_loader))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
    train_loader, _, _, _ = dataset.get_dataloaders(opt, 'instance')
    _, y, index = next(iter(train_loader))
    labels = train_loader.dataset.targets
    assert y.tolist() == [labels[i] for i in index.tolist()]
    train_loader, val_loader, _, _ = dataset.get_dataloaders(opt, 'crd')
    _, y, index, contrast = next(iter(train_loader))
    assert contrast.shape == (8, 13) and torch.equal(contrast[:, 0], index)
    labels = torch.tensor(labels)
    assert (labels[contrast[:, 1:]] != y[:, None]).all()
    assert len(next(iter(val_loader))) == 2
    # the default sizes
    assert dataset.get_dataloaders(make_opt(dataset='synthetic'))[3] == 5000
    assert dataset.image_size('synthetic') == 32


def test_synthetic_is_learnable():
    torch.manual_seed(0)
    train = synthetic.SyntheticImages(1000, train=True)
    val = synthetic.SyntheticImages(500, train=False)
    # a linear model on 4x4-pooled pixels (192 features), to keep this fast; chance is 1%
    x = F.avg_pool2d(torch.stack([train[i][0] for i in range(1000)]), 4).flatten(1)
    y = torch.tensor(train.targets)
    xv = F.avg_pool2d(torch.stack([val[i][0] for i in range(500)]), 4).flatten(1)
    yv = torch.tensor(val.targets)
    model = torch.nn.Linear(x.shape[1], 100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (model(xv).argmax(1) == yv).float().mean().item()
    assert acc > 0.2, acc


def test_unknown_dataset():
    with pytest.raises(UserError, match='cifar100'):
        dataset.get_dataloaders(make_opt(dataset='mnist'))
    with pytest.raises(UserError):
        dataset.image_size('mnist')
    assert dataset.image_size('cifar100') == 32 and dataset.image_size('imagenet') == 224
