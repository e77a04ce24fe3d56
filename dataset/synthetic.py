"""A CIFAR-shaped synthetic data set: no files, no download, the same images for every run.

Each class is a fixed smooth random colour pattern on a 48x48 canvas; an image is a 32x32 window of its class's
pattern at a random offset plus Gaussian noise. Everything about an image (its label, offset and noise) follows
from ``(seed, split, index)`` alone, so images are made on the fly, cost no memory, and teacher and student runs
see the same data whatever their own ``--seed``. Images come out already normalised (about zero mean and unit
variance per channel), as 3x32x32 float32 like the CIFAR loader's; training images get CIFAR's random crop
(padding 4) and horizontal flip.
"""
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUM_CLASSES = 100
TRAIN_SIZE = 5000
VAL_SIZE = 1000
SEED = 0
IMAGE = 32
CANVAS = 48        # room for offsets of 0..16 pixels: large enough that a linear model cannot just
                   # match templates (it reaches about 45%, resnet8 about 30% after 3 epochs)
GRID = 8           # the pattern's detail: an 8x8 random grid per channel, smoothly upsampled
NOISE = 1.5        # noise std relative to the pattern's (unit) std


def _class_patterns(num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, GRID, GRID, generator=g)
    patterns = F.interpolate(coarse, size=(CANVAS, CANVAS), mode='bicubic', align_corners=False)
    patterns = patterns - patterns.mean(dim=(1, 2, 3), keepdim=True)
    return patterns / patterns.std(dim=(1, 2, 3), keepdim=True)


def random_crop_flip(img, padding=4):
    """CIFAR's train augmentation on a normalised CHW tensor (zero padding = the mean colour)."""
    _, h, w = img.shape
    padded = F.pad(img, (padding, padding, padding, padding))
    top, left = torch.randint(2 * padding + 1, (2,)).tolist()
    out = padded[:, top:top + h, left:left + w]
    if torch.rand(()) < 0.5:
        out = out.flip(-1)
    return out.contiguous()


class SyntheticImages(Dataset):
    """``size`` images of ``num_classes`` classes; items are ``(x, y)``. ``transform``, if given, replaces the
    training augmentation (it receives the normalised CHW tensor)."""

    def __init__(self, size, train=True, num_classes=NUM_CLASSES, seed=SEED, augment=None, transform=None):
        if size < 1:
            raise ValueError('size must be positive')
        self.size = int(size)
        self.train = train
        self.num_classes = num_classes
        self.seed = int(seed)
        self.augment = train if augment is None else augment
        self.transform = transform
        self.patterns = _class_patterns(num_classes, self.seed)
        split = 0 if train else 1
        g = torch.Generator().manual_seed(self.seed * 2 + split + 1)
        # every class equally often (up to one), in a shuffled order
        self.targets = (torch.arange(self.size) % num_classes)[torch.randperm(self.size, generator=g)].tolist()
        self.classes = ['pattern_%d' % c for c in range(num_classes)]

    def __len__(self):
        return self.size

    def identity(self):
        """What fixes every image and label (for ``dataset.test_set_identity``)."""
        return repr(('synthetic', self.size, self.train, self.num_classes, self.seed, self.augment))

    def image(self, index):
        """The un-augmented image ``index``: always the same tensor for the same (seed, split, index)."""
        split = 0 if self.train else 1
        g = torch.Generator().manual_seed(((self.seed * 2 + split) << 32) + int(index))
        top, left = torch.randint(CANVAS - IMAGE + 1, (2,), generator=g).tolist()
        window = self.patterns[self.targets[index], :, top:top + IMAGE, left:left + IMAGE]
        noise = torch.randn(3, IMAGE, IMAGE, generator=g)
        return (window + NOISE * noise) / (1.0 + NOISE ** 2) ** 0.5

    def __getitem__(self, index):
        img = self.image(index)
        if self.transform is not None:
            img = self.transform(img)
        elif self.augment:
            img = random_crop_flip(img)
        return img, self.targets[index]


def build_datasets(opt):
    """-> (train_set, val_set) for ``get_dataloaders``; sizes from ``opt.synthetic_train_size`` and
    ``opt.synthetic_val_size``, the data's seed from ``opt.synthetic_seed`` (not ``opt.seed``)."""
    seed = getattr(opt, 'synthetic_seed', None)
    seed = SEED if seed is None else seed
    train_size = getattr(opt, 'synthetic_train_size', None) or TRAIN_SIZE
    val_size = getattr(opt, 'synthetic_val_size', None) or VAL_SIZE
    train_set = SyntheticImages(train_size, train=True, seed=seed)
    val_set = SyntheticImages(val_size, train=False, seed=seed)
    return train_set, val_set
