"""The method registry and the interface every distillation method implements.

A method is one file that defines its loss (the well-known RepDistiller class, e.g.
``Attention``) and a ``Distiller`` subclass registered under its ``--distill`` name.
The training loop only ever calls::

    loss_kd = distiller(feat_s, feat_t, logit_s, logit_t, batch)

so adding a method never touches ``train_student.py`` or ``helper/loops.py``.
"""
import torch
import torch.nn as nn

DISTILLERS = {}


def register(name):
    """Class decorator: make a ``Distiller`` subclass available as ``--distill name``."""
    def wrap(cls):
        if name in DISTILLERS:
            raise ValueError('distiller {!r} registered twice'.format(name))
        cls.name = name
        DISTILLERS[name] = cls
        return cls
    return wrap


class Distiller(nn.Module):
    """Base class: the ``-b`` term of ``gamma*CE + alpha*KD + beta*distiller(...)``.

    Constructed once, before training, from the features of one probe forward pass
    (``feat_s``/``feat_t``: the model's ``is_feat=True`` lists for a dummy batch of
    ``opt.batch_size`` images) so adapters know their shapes. Its parameters are trained
    with the student and saved in the student checkpoint; its buffers (e.g. CRD's memory
    bank) are saved too.

    Class attributes a method may override:
      data_mode  'plain' -> batches are (x, y); 'crd' -> (x, y, index, contrast_idx)
                 (the loader draws ``opt.nce_k`` negatives per sample); 'instance' ->
                 (x, y, index).
      drop_last  True when the method cannot take a smaller last batch (SemCKD).
    """
    name = None
    data_mode = 'plain'
    drop_last = False

    def __init__(self, feat_s, feat_t, opt):
        super().__init__()

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        """Return the method's loss as a 0-dim tensor.

        ``batch`` is a dict with ``'target'`` and, per ``data_mode``, ``'index'`` and
        ``'contrast_idx'`` (already on the run's device).
        """
        raise NotImplementedError


def build_distiller(name, feat_s, feat_t, opt):
    """Instantiate the method registered as ``name``; ``KeyError`` lists valid names."""
    if name not in DISTILLERS:
        raise KeyError("unknown --distill '{}'; valid methods: {}".format(name, ', '.join(sorted(DISTILLERS))))
    return DISTILLERS[name](feat_s, feat_t, opt)


def zero_loss(like):
    """A 0-dim zero on the device/dtype of ``like`` (for methods with no extra term)."""
    return torch.zeros((), device=like.device, dtype=like.dtype)
