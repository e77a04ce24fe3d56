"""--gpu_loader: the device-resident CIFAR loader against torchvision's pipeline and the standard loaders."""
import argparse
import glob
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

import dataset
from dataset import cifar100, synthetic
from dataset.gpu_loader import GPULoader, epoch_indices
from fake_data import write_fake_cifar100
from conftest import run_script
from helper.errors import UserError

N_TRAIN = 200  # fake CIFAR: 100 classes, two images each, random pixels (so every image and shift is distinct)


@pytest.fixture(autouse=True)
def one_thread():
    # two OpenMP threads on two shared cores spin-wait for each other when another process holds a core
    # (20x slower steps); these tests measure behaviour, not speed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_opt(**kw):
    base = dict(dataset='cifar100', data_folder=None, batch_size=16, num_workers=0, seed=7, gpu_loader=True,
                nce_k=16, mode='exact', distributed=False, world_size=1, rank=0, dali=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope='module')
def fake_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar')
    written = write_fake_cifar100(root, n_train=N_TRAIN, n_test=40)
    images = torch.from_numpy(written['train'][0].reshape(-1, 3, 32, 32).copy())
    return str(root), images, torch.tensor(written['train'][1])


def normalised_padded(images):
    """What torchvision sees before cropping: zero padding 4 on the uint8 image, then ToTensor + Normalize."""
    mean = torch.tensor(cifar100.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cifar100.STD).view(1, 3, 1, 1)
    return F.pad(images, (4, 4, 4, 4)).float().div(255).sub_(mean).div_(std)


def recover_crops(x, padded):
    """For each output image, the (top, left, flip) whose crop of its padded original it equals; None if none."""
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # [B, 3, 9, 9, 32, 32]
    errors = [(windows - target[:, :, None, None]).abs().amax(dim=(1, 4, 5)).flatten(1)  # [B, 81]
              for target in (x, x.flip(-1))]
    found = []
    for i in range(x.shape[0]):
        hit = None
        for flip, err in zip((False, True), errors):
            if float(err[i].min()) < 1e-5:
                top, left = divmod(int(err[i].argmin()), 9)
                hit = (top, left, flip)
        found.append(hit)
    return found


def test_crops_flips_and_normalisation_match_torchvision(fake_cifar):
    root, images, labels = fake_cifar
    train_loader, val_loader, sampler, n_data = dataset.get_dataloaders(make_opt(data_folder=root), 'instance')
    assert sampler is train_loader and n_data == N_TRAIN and len(train_loader.dataset) == N_TRAIN
    padded = normalised_padded(images)
    offsets = torch.zeros(9, 9, dtype=torch.long)
    flips = seen = 0
    sums = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for epoch in range(1, 6):
        sampler.set_epoch(epoch)
        for x, y, index in train_loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
            assert torch.equal(y, labels[index])
            for top, left, flip in recover_crops(x, padded[index]):  # unpacking fails if a crop matched nothing
                offsets[top, left] += 1
                flips += flip
                seen += 1
            sums += x.double().sum(dim=(0, 2, 3))
            squares += x.double().pow(2).sum(dim=(0, 2, 3))
    assert seen == 5 * N_TRAIN
    # every shift in [-4, 4] on both axes, about uniformly (81 cells of ~12.3 each: chi-square, 80 dof)
    assert (offsets > 0).all(), offsets
    expected = seen / 81.0
    chi2 = float(((offsets.double() - expected) ** 2 / expected).sum())
    assert chi2 < 80 + 5 * math.sqrt(160), chi2
    assert abs(flips / seen - 0.5) < 4 * math.sqrt(0.25 / seen), flips / seen

    # per-channel statistics of the standard loader on the same images (its epochs draw torchvision's crops)
    opt = make_opt(data_folder=root, gpu_loader=False)
    std_loader, _, std_sampler, _ = dataset.get_dataloaders(opt, 'plain')
    s_sums = torch.zeros(3, dtype=torch.float64)
    s_squares = torch.zeros(3, dtype=torch.float64)
    torch.manual_seed(0)
    for epoch in range(1, 3):
        std_sampler.set_epoch(epoch)
        for x, _ in std_loader:
            s_sums += x.double().sum(dim=(0, 2, 3))
            s_squares += x.double().pow(2).sum(dim=(0, 2, 3))
    pixels, s_pixels = seen * 1024, 2 * N_TRAIN * 1024
    mean, s_mean = sums / pixels, s_sums / s_pixels
    std, s_std = (squares / pixels - mean ** 2).sqrt(), (s_squares / s_pixels - s_mean ** 2).sqrt()
    assert torch.allclose(mean, s_mean, atol=0.02), (mean, s_mean)
    assert torch.allclose(std, s_std, atol=0.02), (std, s_std)
    # and the validation loader is the standard, un-augmented one
    x, y = next(iter(val_loader))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64


def test_epoch_order_covers_every_image_and_is_reproducible(fake_cifar):
    root, _, _ = fake_cifar
    a, _, _, _ = dataset.get_dataloaders(make_opt(data_folder=root), 'instance')
    b, _, _, _ = dataset.get_dataloaders(make_opt(data_folder=root), 'instance')
    assert len(a) == math.ceil(N_TRAIN / 16)

    def epoch(loader, e):
        loader.set_epoch(e)
        batches = list(loader)
        return torch.cat([bt[2] for bt in batches]), torch.cat([bt[0] for bt in batches])

    order1, x1 = epoch(a, 1)
    assert sorted(order1.tolist()) == list(range(N_TRAIN))
    order2, x2 = epoch(a, 2)
    assert sorted(order2.tolist()) == list(range(N_TRAIN)) and not torch.equal(order1, order2)
    # a second instance (a resumed run) at the same (seed, epoch): same order and the same augmented pixels
    order1b, x1b = epoch(b, 1)
    assert torch.equal(order1, order1b) and torch.equal(x1, x1b)
    # and a second pass over the same epoch too
    assert torch.equal(epoch(a, 1)[1], x1)
    # the standard loader's order for the same seed
    ref = DistributedSampler(range(N_TRAIN), num_replicas=1, rank=0, shuffle=True, seed=7)
    ref.set_epoch(2)
    assert order2.tolist() == list(ref)
    # another seed, another order
    c, _, _, _ = dataset.get_dataloaders(make_opt(data_folder=root, seed=8), 'instance')
    assert not torch.equal(epoch(c, 1)[0], order1)


def test_drop_last_and_ddp_shards(fake_cifar):
    root, _, _ = fake_cifar
    for world_size in (3, 4):
        shards = []
        for rank in range(world_size):
            opt = make_opt(data_folder=root, distributed=True, world_size=world_size, rank=rank, batch_size=8)
            loader, _, _, _ = dataset.get_dataloaders(opt, 'instance', drop_last=True)
            loader.set_epoch(3)
            batches = list(loader)
            assert len(batches) == len(loader) == math.ceil(N_TRAIN / world_size) // 8  # the same on every rank
            assert all(len(bt[0]) == 8 for bt in batches)
            ref = DistributedSampler(range(N_TRAIN), num_replicas=world_size, rank=rank, shuffle=True, seed=7)
            ref.set_epoch(3)
            assert loader.indices().tolist() == list(ref)
            shards.append(loader.indices().tolist())
        if N_TRAIN % world_size == 0:
            flat = sum(shards, [])
            assert sorted(flat) == list(range(N_TRAIN))  # disjoint and complete
        else:
            # DistributedSampler's padding: the shards cover every image, and only the padding repeats
            assert set(sum(shards, [])) == set(range(N_TRAIN))
            assert len(sum(shards, [])) == N_TRAIN + (-N_TRAIN) % world_size
    with pytest.raises(UserError, match='batch_size'):
        dataset.get_dataloaders(make_opt(data_folder=root, batch_size=N_TRAIN + 1), 'plain', drop_last=True)


def test_crd_contrast_indices(fake_cifar):
    root, _, labels = fake_cifar
    for mode in ('exact', 'relax'):
        loader, _, _, _ = dataset.get_dataloaders(make_opt(data_folder=root, nce_k=50, mode=mode), 'crd')
        x, y, index, contrast = next(iter(loader))
        assert contrast.shape == (16, 51) and contrast.dtype == torch.int64
        assert torch.equal(y, labels[index])
        negatives = contrast[:, 1:]
        assert (labels[negatives] != y[:, None]).all()  # never the sample's own class
        assert all(len(set(row.tolist())) == 50 for row in negatives)  # without replacement
        if mode == 'exact':
            assert torch.equal(contrast[:, 0], index)
        else:
            assert torch.equal(labels[contrast[:, 0]], y)
    # k = every other-class sample: each row's negatives are exactly those
    loader, _, _, _ = dataset.get_dataloaders(make_opt(data_folder=root, nce_k=N_TRAIN - 2), 'crd')
    _, y, _, contrast = next(iter(loader))
    for row, label in zip(contrast[:, 1:], y):
        assert sorted(row.tolist()) == torch.nonzero(labels != label).flatten().tolist()
    # k above that (below and above the set's size): drawn with replacement, still never the own class
    for k in (N_TRAIN - 1, 500):
        loader, _, _, _ = dataset.get_dataloaders(make_opt(data_folder=root, nce_k=k), 'crd')
        _, y, _, contrast = next(iter(loader))
        assert contrast.shape == (16, k + 1) and (labels[contrast[:, 1:]] != y[:, None]).all()
        assert contrast.min() >= 0 and contrast.max() < N_TRAIN
        assert any(len(set(row.tolist())) < k for row in contrast[:, 1:])


def test_synthetic_images_stay_float_and_unchanged_but_for_crop_and_flip():
    opt = make_opt(dataset='synthetic', synthetic_train_size=48, synthetic_val_size=16, synthetic_seed=None)
    loader, val_loader, _, n_data = dataset.get_dataloaders(opt, 'instance')
    assert n_data == 48 and len(loader) == 3
    train_set = synthetic.SyntheticImages(48, train=True)
    x, y, index = next(iter(loader))
    assert torch.equal(y, torch.tensor(train_set.targets)[index])
    originals = torch.stack([train_set.image(i) for i in index.tolist()])
    assert all(hit is not None for hit in recover_crops(x, F.pad(originals, (4, 4, 4, 4))))
    assert len(next(iter(val_loader))) == 2


def test_gpu_loader_refuses_imagenet():
    with pytest.raises(UserError, match='--gpu_loader'):
        dataset.get_dataloaders(make_opt(dataset='imagenet'))


def test_epoch_indices_pad_tiny_sets():
    # more ranks than images: DistributedSampler repeats the permutation several times over
    shards = [epoch_indices(3, 0, 0, world_size=7, rank=r).tolist() for r in range(7)]
    ref = [list(DistributedSampler(range(3), num_replicas=7, rank=r, seed=0)) for r in range(7)]
    assert shards == ref


def test_loader_on_the_cpu_device_needs_no_host_copy():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    loader = GPULoader(images, torch.arange(10) % 2, batch_size=4, seed=0, mean=cifar100.MEAN, std=cifar100.STD)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [4, 4, 2] and all(b[0].device == images.device for b in batches)


def _final_test_acc(cwd):
    (path,) = glob.glob(os.path.join(str(cwd), 'save', 'models', '*', 'metrics.jsonl'))
    with open(path) as f:
        return [json.loads(line) for line in f][-1]['test_acc']


def test_training_with_the_gpu_loader_learns_like_the_standard_loader(tmp_path):
    # 2048 images rather than 512: in 2 epochs of 512 no loader gets the net clear of chance on this set
    args = ['--model', 'wrn_16_1', '--dataset', 'synthetic', '--synthetic_train_size', '2048',
            '--synthetic_val_size', '256', '--epochs', '2', '--batch_size', '32', '--num_workers', '0',
            '--learning_rate', '0.1', '--seed', '0', '--print-freq', '1000']
    accs = {}
    for name, extra in (('standard', []), ('gpu', ['--gpu_loader'])):
        cwd = tmp_path / name
        cwd.mkdir()
        run_script('train_teacher.py', args + extra, cwd)
        accs[name] = _final_test_acc(cwd)
    # chance is 1%; 4% of 256 images is 5 standard deviations above it
    assert accs['standard'] > 4 and accs['gpu'] > 4, accs
    assert abs(accs['standard'] - accs['gpu']) < 8, accs
