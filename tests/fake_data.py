"""Tiny on-disk data sets for the tests, in the same formats users have on disk.

``write_fake_cifar100`` writes ``cifar-100-python/{train,test,meta}`` the way the official archive has them:
Python-2 pickles, whose strings are old-style byte strings (so ``encoding='latin1'`` gives str keys and
``encoding='bytes'`` gives bytes keys), with ``data`` a uint8 numpy array of shape [N, 3072] (the three colour
planes one after the other) and the labels Python lists.

``write_fake_imagefolder`` writes real JPEG files in the ImageFolder layout ``{train,val}/<class>/<file>.jpg``.
"""
import io
import os
import pickle
import struct

import numpy as np
from PIL import Image


class Py2Pickler(pickle._Pickler):
    """Pickles like Python 2's cPickle at protocol 2: every str and bytes becomes a Python-2 ``str``.

    Python 2 had one string type for text and raw bytes; it is written with the SHORT_BINSTRING/BINSTRING
    opcodes, which Python 3 decodes according to ``pickle.load(..., encoding=...)``.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj):
        raw = obj.encode('latin1') if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack('<i', len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None):
        # numpy 2 lives in numpy._core; the official files name numpy.core, as numpy 1 on Python 2 did.
        module = getattr(obj, '__module__', None) or ''
        if module.startswith('numpy._core'):
            name = name or obj.__qualname__
            module = 'numpy.core' + module[len('numpy._core'):]
            self.write(pickle.GLOBAL + module.encode('ascii') + b'\n' + name.encode('ascii') + b'\n')
            self.memoize(obj)
            return
        super().save_global(obj, name)



def py2_pickle_bytes(obj):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def fake_cifar_arrays(n, seed, num_classes=100, labels=None):
    """Random uint8 images [n, 3072] and labels (every class once before any repeats, unless given)."""
    rng = np.random.RandomState(seed)
    data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
    if labels is None:
        labels = rng.permutation(np.arange(n) % num_classes)
    labels = [int(v) for v in labels]
    return data, labels


def write_cifar_pickle(path, obj):
    with open(path, 'wb') as f:
        f.write(py2_pickle_bytes(obj))


def write_fake_cifar100(root, n_train=200, n_test=100, seed=0, train_labels=None, test_labels=None):
    """Write a tiny CIFAR-100 under ``root/cifar-100-python``; returns a dict of the arrays written.

    ``train_labels``/``test_labels`` (sequences of ints in 0..99) override the default balanced labels, e.g.
    to build unbalanced classes.
    """
    folder = os.path.join(str(root), 'cifar-100-python')
    os.makedirs(folder, exist_ok=True)
    written = {}
    for split, n, labels, split_seed in (('train', n_train, train_labels, seed),
                                         ('test', n_test, test_labels, seed + 1)):
        data, labels = fake_cifar_arrays(n, split_seed, labels=labels)
        assert data.shape[0] == len(labels)
        coarse = [v // 5 for v in labels]
        write_cifar_pickle(os.path.join(folder, split), {
            'filenames': ['img_%05d.png' % i for i in range(len(labels))],
            'batch_label': '%s batch 1 of 1' % ('training' if split == 'train' else 'testing'),
            'fine_labels': labels,
            'coarse_labels': coarse,
            'data': data,
        })
        written[split] = (data, labels)
    write_cifar_pickle(os.path.join(folder, 'meta'), {
        'fine_label_names': ['class_%02d' % i for i in range(100)],
        'coarse_label_names': ['super_%02d' % i for i in range(20)],
    })
    return written


def write_fake_imagefolder(root, classes=3, per_class=4, size=(40, 48), seed=0, splits=('train', 'val')):
    """Write JPEGs under ``root/{train,val}/class_<i>/``; ``size`` is (width, height). Returns ``root``."""
    rng = np.random.RandomState(seed)
    width, height = size
    for split in splits:
        for c in range(classes):
            folder = os.path.join(str(root), split, 'class_%d' % c)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = rng.randint(0, 256, size=(height, width, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, 'img_%d.jpg' % i), format='JPEG')
    return str(root)
