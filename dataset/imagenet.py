"""ImageNet and Imagenette as ImageFolder trees: ``train/<class>/<image>`` and ``val/<class>/<image>``.

The trees are looked for in ``<data_folder>/<dataset>/`` (the reference's ``./data/imagenet``) and then in
``<data_folder>/`` itself, so ``--data_folder /datasets/imagenet`` works too. Imagenette uses the same layout
(the reference crashes on it; quirk 12).
"""
import os

from torchvision import datasets, transforms

from helper.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def train_transform():
    return transforms.Compose([
        transforms.RandomResizedCrop(224),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def test_transform():
    return transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def find_root(data_folder, dataset):
    """The folder holding ``train/`` and ``val/``: ``<data_folder>/<dataset>`` if it has them, else
    ``<data_folder>``."""
    nested = os.path.join(str(data_folder), dataset)
    for candidate in (nested, str(data_folder)):
        if os.path.isdir(os.path.join(candidate, 'train')) or os.path.isdir(os.path.join(candidate, 'val')):
            return candidate
    raise UserError('%s data not found: expected ImageFolder trees train/ and val/ in %s or in %s; '
                    'pass --data_folder pointing at them' % (dataset, nested, data_folder))


def _open_folder(cls, folder, **kwargs):
    if not os.path.isdir(folder):
        raise UserError('%s not found; put the images there as <class>/<image> (ImageFolder layout)' % folder)
    try:
        return cls(folder, **kwargs)
    except FileNotFoundError as err:
        # torchvision's words for "no class folders" or "no image files in them"
        raise UserError('%s holds no images in ImageFolder layout <class>/<image> (%s); put the images there'
                        % (folder, str(err).splitlines()[0])) from err


def build_datasets(opt, num_classes):
    """-> (train_set, val_set) for ``get_dataloaders``."""
    root = find_root(getattr(opt, 'data_folder', None) or './data', opt.dataset)
    train_dir, val_dir = os.path.join(root, 'train'), os.path.join(root, 'val')
    train_set = _open_folder(datasets.ImageFolder, train_dir, transform=train_transform())
    val_set = _open_folder(datasets.ImageFolder, val_dir, transform=test_transform())
    if train_set.classes != val_set.classes:
        # labels are class folders' positions in sorted order, so differing lists would mislabel val
        raise UserError('%s and %s must hold the same class folders (%d vs %d; first difference: %s)'
                        % (train_dir, val_dir, len(train_set.classes), len(val_set.classes),
                           sorted(set(train_set.classes) ^ set(val_set.classes))[:1]))
    if len(train_set.classes) > num_classes:
        raise UserError('%s holds %d class folders, but --dataset %s has %d classes'
                        % (train_dir, len(train_set.classes), opt.dataset, num_classes))
    return train_set, val_set
