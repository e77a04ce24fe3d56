"""The method registry and the interface every distillation method implements.

A method is one file that defines its loss (the well-known reference class, e.g.
``Attention``) and a ``Distiller`` subclass registered under its ``--distill`` name. The
subclass holds everything the rest of the code base needs to know about the method: its
flags, its reference loss weights and table label, the inputs it needs from the loader and
the models, and its optional hooks. The training loop, the scripts and the tests read those
facts from here and never ask which method runs, so adding a method is one file plus its
line in ``distiller_zoo/__init__.py``.

One step's loss (``helper/loops.py``)::

    loss = gamma * CE(logit_s, y)
         + alpha * KL_T(logit_s, logit_t)        # dropped when the method sets replaces_kd
         + beta  * sum(terms.values())           # terms: the distiller's output ({'kd': t} for a tensor t)
"""
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn

DISTILLERS = {}
DEFAULT_TERM = 'kd'  # the name under which a method's single-tensor loss is logged (loss_kd)


def register(name):
    """Class decorator: make a ``Distiller`` subclass available as ``--distill name``."""
    def wrap(cls):
        if name in DISTILLERS:
            raise ValueError('distiller {!r} registered twice'.format(name))
        cls.name = name
        DISTILLERS[name] = cls
        return cls
    return wrap


def unregister(name):
    """Remove ``--distill name`` again (tests register throw-away methods)."""
    DISTILLERS.pop(name)


@dataclass
class InitStage:
    """An initialisation stage trained before the main stage (RepDistiller's ``helper/pretrain.py``).

    For ``epochs`` epochs over the training set, ``Distiller.init_loss`` alone (no
    cross-entropy, no weights) is minimised by SGD over ``modules_to_train`` (which may
    include the student or parts of it) at the constant learning rate ``lr``, with the run's
    momentum and weight decay. The teacher and every other module stay in eval mode and are
    not updated.

    A module that only the stage trains (FT's paraphraser, AB's connector) is frozen by its
    method (``requires_grad`` False), so that the main stage's optimiser and DDP wrapper,
    built before the loop asks for the stage, leave it out. The stage trains it all the
    same: a stage with epochs lets every parameter of ``modules_to_train`` require a
    gradient when it is built, and ``InitObjective.finish`` freezes the ``frozen`` ones again
    before the main stage.
    """
    epochs: int
    modules_to_train: List[nn.Module] = field(default_factory=list)
    lr: float = 0.05
    frozen: List[nn.Parameter] = field(init=False, repr=False, compare=False, default_factory=list)

    def __post_init__(self):
        if self.epochs > 0:
            self.frozen = [p for m in self.modules_to_train for p in m.parameters() if not p.requires_grad]
            for p in self.frozen:
                p.requires_grad_(True)


class Distiller(nn.Module):
    """Base class of every method: the ``-b`` term of the loss, and the facts about the method.

    Constructed once, before training, from the features of one probe forward pass
    (``feat_s``/``feat_t``: the models' ``is_feat=True`` lists, with ``preact=True`` where the
    method asks for it, see ``preact_modes``) so adapters know their shapes.
    ``model_s``/``model_t`` are the student and the frozen teacher, for methods that read or
    reuse their modules; keep a frozen module out of the parameters (e.g. in a plain list or
    with ``requires_grad`` False): only parameters that require a gradient reach the optimiser. The distiller's parameters are
    trained with the student and saved in the student checkpoint; its buffers (e.g. CRD's
    memory bank) are saved too.
    """
    # ---- facts, read by the sweep, the summary, the README table and the tests; write them as
    # literals in the class body (scripts/methods.py reads them from the source, without torch)
    name = None              # the --distill name, set by @register
    display_name = None      # table row label, e.g. 'FitNet'
    source = ''              # the reference code it was checked against
    weights = {'gamma': 1.0, 'alpha': 1.0, 'beta': 0.0}   # reference CIFAR-100 -r / -a / -b
    pair_weights = {}        # {(model_t, model_s): {...}}: per-pair overrides of ``weights``

    # ---- what the loop provides
    data_mode = 'plain'      # 'plain' (x, y) | 'instance' (+ batch['index']) | 'crd' (+ 'index', 'contrast_idx')
    extra_views = 0          # > 0: the loader also yields that many more augmented views, batch['views']
    drop_last = False        # cannot take a smaller last batch (SemCKD)
    preact = False           # features from model(x, is_feat=True, preact=True)
    preact_s = None          # the student's / the teacher's own setting where they differ (ReviewKD);
    preact_t = None          # None: ``preact``
    replaces_kd = False      # True: the loop drops alpha * KL_T; the method gives its own logit loss
                             # (read from the instance: a switch may set it in __init__)
    teacher_train_mode = False  # True: the frozen teacher runs in train mode (BN on batch statistics) in the
                                # main stage, a reference quirk kept where published numbers depend on it (OFD)
    changes_prediction = False  # True: validation, the best checkpoint and the training accuracy use predict()

    @classmethod
    def add_arguments(cls, parser):
        """Add the method's own flags to ``parser`` (an argument group named after the method).

        A flag that several methods share is declared with ``shared_argument``.
        """

    @classmethod
    def view_transform(cls, dataset):
        """The augmentation of the extra views (``extra_views > 0``) for ``--dataset`` ``dataset``
        (its name), applied to the data set's un-augmented image; ``None``: another draw of the
        data set's own training augmentation."""
        return None

    def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
        super().__init__()

    def on_epoch_start(self, epoch):
        """Called before every epoch of the main stage (1-based), after a resume too."""

    def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
        """The method's loss: a 0-dim tensor, or a dict of named 0-dim tensors (summed, then
        weighted by ``-b``; each is logged as ``loss_<name>``).

        ``batch`` is a dict with ``'target'`` and, per ``data_mode``/``extra_views``,
        ``'index'``, ``'contrast_idx'`` and ``'views'`` (already on the run's device); with
        ``extra_views``, ``'view_outputs'`` too: ``(feat_s, feat_t, logit_s, logit_t)`` of each view.

        A method that sets ``changes_prediction`` also leaves this step's prediction (what
        ``predict`` gives, from this same pass, detached) in ``self.train_prediction``: the
        training accuracy is computed from it without running the method's modules twice
        (a second pass would update their batch-norm statistics again).
        """
        raise NotImplementedError

    def predict(self, feat_s, logit_s):
        """The student's test-time logits when ``changes_prediction`` is set."""
        return logit_s

    def init_stage(self, opt):
        """``None``, or an ``InitStage`` to train before the main stage."""
        return None

    def init_loss(self, feat_s, feat_t, logit_s, logit_t, batch):
        """The loss of the init stage (a tensor or a dict of named tensors, summed unweighted)."""
        raise NotImplementedError('{} has no init stage'.format(type(self).__name__))


def preact_modes(method):
    """``(preact_s, preact_t)`` of a method class: each its own setting, else ``preact``."""
    return tuple(method.preact if side is None else side for side in (method.preact_s, method.preact_t))


class StudentPredictor(nn.Module):
    """What validation runs for a method that changes how the student predicts.

    Switching it to eval mode hands rank 0's buffers of the method's modules (e.g. batch-norm
    statistics of a projector that predicts) to every process, as DDP does for the student:
    the prediction, the reduced accuracy and the saved checkpoint then agree.
    """

    def __init__(self, model_s, distiller):
        super().__init__()
        self.model_s = model_s
        self.distiller = distiller

    def train(self, mode=True):
        super().train(mode)
        if not mode and torch.distributed.is_available() and torch.distributed.is_initialized():
            for buf in self.distiller.buffers():
                torch.distributed.broadcast(buf, src=0)
        return self

    def forward(self, x):
        preact_s, _ = preact_modes(type(self.distiller))
        return self.distiller.predict(*self.model_s(x, is_feat=True, preact=preact_s))


def build_distiller(name, feat_s, feat_t, opt, model_s=None, model_t=None):
    """Instantiate the method registered as ``name``; ``KeyError`` lists valid names."""
    if name not in DISTILLERS:
        raise KeyError("unknown --distill '{}'; valid methods: {}".format(name, ', '.join(sorted(DISTILLERS))))
    return DISTILLERS[name](feat_s, feat_t, opt, model_s=model_s, model_t=model_t)


def reference_weights(name, model_t=None, model_s=None):
    """The reference ``{'gamma', 'alpha', 'beta'}`` of a method, for a pair if it has its own."""
    cls = DISTILLERS[name]
    weights = dict(Distiller.weights, **cls.weights)
    weights.update(cls.pair_weights.get((model_t, model_s), {}))
    return weights


def method_table():
    """``{name: {'display_name', 'weights', 'source', 'pair_weights'}}`` of every registered method, in
    registration order (the order of ``distiller_zoo/__init__.py``)."""
    return {name: {'display_name': cls.display_name or name, 'weights': reference_weights(name),
                   'source': cls.source, 'pair_weights': dict(cls.pair_weights)}
            for name, cls in DISTILLERS.items()}


def shared_argument(parser, flag, **kwargs):
    """Declare ``flag`` unless another method already did (e.g. ``--feat_dim`` of CC and CRD).

    The methods must agree on its type and default; a disagreement is a programming error.
    """
    existing = parser._option_string_actions.get(flag)
    if existing is None:
        parser.add_argument(flag, **kwargs)
    elif existing.default != kwargs.get('default') or existing.type != kwargs.get('type'):
        raise ValueError('{} is declared twice with different types or defaults'.format(flag))


def zero_loss(like):
    """A 0-dim zero on the device/dtype of ``like`` (for methods with no extra term)."""
    return torch.zeros((), device=like.device, dtype=like.dtype)
