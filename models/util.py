"""Small trainable heads that distillation methods put on top of features, and accessors.

Names, constructor arguments and parameter names follow RepDistiller's ``models/util.py``
so code and state dicts written against it keep working. SemCKD's attention modules
(``SelfA``, ``AAEmbed``) live with their method in ``distiller_zoo/SemCKD.py``.

The accessors (``get_classifier``, ``get_global_pool``, ``PoolInput``, ``ClassifierMap``) give
methods that reuse a network's classifier (CAT-KD, SimKD) the layers and the map they need
without changing any model's ``forward``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError

# attribute holding the classifier, per family (a Sequential's last Linear counts):
# resnet, wrn, resnet_imagenet, ShuffleV2_Imagenet: fc; resnetv2 (CIFAR ResNet50),
# ShuffleV1, ShuffleV2: linear; vgg: classifier; mobilenetv2: classifier.0
CLASSIFIER_NAMES = ('fc', 'linear', 'classifier')

# attribute holding the global average pooling whose input is the last feature map
GLOBAL_POOL_NAMES = ('avgpool', 'pool4')


def _unwrap(model):
    # DistributedDataParallel keeps the network in .module
    return getattr(model, 'module', model)


def get_classifier(model):
    """The final ``nn.Linear`` of a zoo network: the layer that maps ``feats[-1]`` to logits.

    RepDistiller's and SimKD's ``get_feat_modules()[-1]``; ours leave the classifier out
    of ``get_feat_modules``, hence this accessor.
    """
    model = _unwrap(model)
    for name in CLASSIFIER_NAMES:
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear):
            return layer
        if isinstance(layer, nn.Sequential):
            linears = [m for m in layer if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1]
    raise UserError('{} has no classifier named {}'.format(type(model).__name__, ' / '.join(CLASSIFIER_NAMES)))


def get_global_pool(model):
    """The module that averages the last feature map to the vector the classifier reads.

    Only networks that pool globally through a module qualify (every CIFAR family and the
    ImageNet ResNets); a network that pools with a function or to more than 1x1 raises
    ``UserError``.
    """
    model = _unwrap(model)
    for name in GLOBAL_POOL_NAMES:
        pool = getattr(model, name, None)
        if isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1)):
            return pool
    raise UserError('{} has no global average pooling module ({}), which this method needs'.format(
        type(model).__name__, ' / '.join(GLOBAL_POOL_NAMES)))


def get_feat_modules(model, role='student'):
    """``model.get_feat_modules()``: the layers up to the last stage map (RepDistiller's
    accessor; the init stages of AB and FSP train them). A network that names none (the
    ImageNet families) raises ``UserError``."""
    model = _unwrap(model)
    if not hasattr(model, 'get_feat_modules'):
        raise UserError('this method trains the feature layers (get_feat_modules) of the {} in its init stage, '
                        'which {} does not name; choose a CIFAR network'.format(role, type(model).__name__))
    return model.get_feat_modules()


class PoolInput:
    """Keeps the input of a network's global pooling from its latest forward pass.

    That map is the last feature map as the classifier sees it before pooling: for most
    families ``feats[-2]``, but for WRN it is after the final BN-ReLU, for MobileNetV2
    after the 1x1 convolution to 1280 channels and for ShuffleV2 after ``conv2``, which
    the ``is_feat`` lists do not hold. A forward hook, so it needs no change of ``forward``
    and follows the network inside DistributedDataParallel. ``feature`` is the tensor
    itself (with its graph in training, in the autocast dtype under AMP).
    """

    def __init__(self, model):
        self.feature = None
        self._handle = get_global_pool(model).register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.feature = inputs[0]

    def remove(self):
        self._handle.remove()


class ClassifierMap:
    """The map a network's classifier reads before its global pooling, at every forward pass.

    ``ClassifierMap(model, size)`` runs ``model`` once on a blank ``size`` x ``size`` batch (no
    gradient, eval mode, the mode restored) to learn whether the pooling reads ``feats[-2]``
    itself: then the map is taken from the feature list, so it comes from whichever copy of
    the network runs (e.g. a BN-folded teacher). Otherwise (WRN, MobileNetV2, ShuffleV2) a
    ``PoolInput`` hook keeps it, and the hooked network must be the one that runs: a pass
    without it raises ``RuntimeError`` instead of reusing a stale map. ``shape`` is the map's shape at ``size``.

    ``cmap(feats)`` returns the map of the pass that gave ``feats``, in the dtype of ``feats``
    (the feature lists may be float32 copies of features computed under autocast).
    """

    def __init__(self, model, size, preact=False):
        hook = PoolInput(model)
        probe = torch.zeros(2, 3, size, size, device=next(model.parameters()).device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            feats, _ = model(probe, is_feat=True, preact=preact)
        model.train(was_training)
        self.shape = tuple(hook.feature.shape)
        self.from_feats = hook.feature is feats[-2]
        if self.from_feats:
            hook.remove()
            self.hook = None
        else:
            hook.feature = None
            self.hook = hook

    def __call__(self, feats):
        if self.hook is None:
            return feats[-2]
        fmap, self.hook.feature = self.hook.feature, None
        if fmap is None:
            raise RuntimeError('the network whose pooling input this method reads did not run in this pass '
                               '(is a copy of it running instead?)')
        return fmap.to(feats[-2].dtype)


class ConvReg(nn.Module):
    """FitNet's regressor: map a student feature map onto the teacher's shape.

    ``s_shape``/``t_shape`` are ``(N, C, H, W)`` shapes from a probe forward pass. The layer
    is chosen from the two heights, in this order (the reference's rules):

    * student twice as tall: 3x3 convolution with stride 2;
    * student half as tall: 4x4 transposed convolution with stride 2;
    * student at least as tall: a "valid" convolution whose kernel absorbs the difference;
    * otherwise: 3x3 "same" convolution, and the *teacher* map is average-pooled down to
      the student's size instead.

    then BatchNorm (and ReLU when ``use_relu``). ``forward(x, t)`` returns the regressed
    student map and the (possibly pooled) teacher map, ready to be compared; ``forward(x)``
    (RepDistiller's form) returns the regressed map alone. RepDistiller has no last rule
    (its ConvReg fails to build there); SemCKD added it.
    """

    def __init__(self, s_shape, t_shape, use_relu=True):
        super().__init__()
        self.use_relu = use_relu
        _, s_C, s_H, s_W = s_shape
        _, t_C, t_H, t_W = t_shape
        self.s_H = s_H
        self.t_H = t_H
        if s_H == 2 * t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
        elif 2 * s_H == t_H:
            self.conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
        elif s_H >= t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))
        else:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=1, padding=1)
        self.bn = nn.BatchNorm2d(t_C)
        self.relu = nn.ReLU(inplace=True)
        # only the last rule leaves the student smaller than the teacher
        self.pool_teacher = not (s_H == 2 * t_H or 2 * s_H == t_H or s_H >= t_H)

    def forward(self, x, t=None):
        x = self.bn(self.conv(x))
        if self.use_relu:
            x = self.relu(x)
        if t is None:
            # RepDistiller's one-argument form (AB's ``Connector`` calls it so)
            return x
        if self.pool_teacher:
            t = F.adaptive_avg_pool2d(t, (self.s_H, self.s_H))
        return x, t


class Regress(nn.Module):
    """FitNet's regressor for a feature vector: flatten, linear, ReLU."""

    def __init__(self, dim_in=1024, dim_out=1024):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.linear(x.reshape(x.shape[0], -1)))


class Embed(nn.Module):
    """Flatten, linear projection to ``dim_out``, then L2-normalise each row."""

    def __init__(self, dim_in=1024, dim_out=128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = Normalize(2)

    def forward(self, x):
        return self.l2norm(self.linear(x.reshape(x.shape[0], -1)))


class LinearEmbed(nn.Module):
    """Flatten and project linearly to ``dim_out`` (no normalisation)."""

    def __init__(self, dim_in=1024, dim_out=128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return self.linear(x.reshape(x.shape[0], -1))


class MLPEmbed(nn.Module):
    """Flatten, two-layer MLP (hidden width ``2 * dim_out``), then L2-normalise each row."""

    def __init__(self, dim_in=1024, dim_out=128):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)
        self.l2norm = Normalize(2)

    def forward(self, x):
        x = self.relu(self.linear1(x.reshape(x.shape[0], -1)))
        return self.l2norm(self.linear2(x))


class Normalize(nn.Module):
    """Divide each row by its ``power``-norm over dim 1.

    No epsilon, as in the reference: an all-zero row gives NaN.
    """

    def __init__(self, power=2):
        super().__init__()
        self.power = power

    def forward(self, x):
        norm = x.pow(self.power).sum(1, keepdim=True).pow(1.0 / self.power)
        return x / norm


def _optional_bn(channels, use_bn):
    # an empty Sequential keeps the layer's index, so the state-dict keys (encoder.3.weight,
    # ...) are the reference's with and without BN
    return nn.BatchNorm2d(channels) if use_bn else nn.Sequential()


def _ft_stack(conv, channels, use_bn):
    """FT's 3x3 stacks: ``conv`` (+ optional BN) + LeakyReLU(0.1) per step of ``channels``; the
    indices of the Sequential are RepDistiller's parameter names (``encoder.3.weight``, ...)."""
    layers = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), _optional_bn(c_out, use_bn), nn.LeakyReLU(0.1, inplace=True)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """FT's paraphraser: a convolutional auto-encoder of the teacher's last stage map.

    ``t_shape`` is the teacher map's ``(N, C, H, W)``; the factor has ``int(C * k)``
    channels at the same size. Encoder: three 3x3 convolutions (C->C->kC->kC), decoder:
    three 3x3 transposed convolutions (kC->kC->C->C), each followed by the optional BN
    and LeakyReLU(0.1), as in RepDistiller (so the reconstruction is LeakyReLU'd too).
    ``forward(f_s, is_factor=False)`` returns ``(factor, reconstruction)``, or the factor
    alone when ``is_factor``.
    """

    def __init__(self, t_shape, k=0.5, use_bn=False):
        super().__init__()
        in_channel = t_shape[1]
        out_channel = int(t_shape[1] * k)
        self.encoder = _ft_stack(nn.Conv2d, [in_channel, in_channel, out_channel, out_channel], use_bn)
        self.decoder = _ft_stack(nn.ConvTranspose2d, [out_channel, out_channel, in_channel, in_channel], use_bn)

    def forward(self, f_s, is_factor=False):
        factor = self.encoder(f_s)
        if is_factor:
            return factor
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """FT's translator: the paraphraser's encoder on the student's map (``s_shape``),
    ending at the teacher factor's ``int(t_shape[1] * k)`` channels; BN on by default."""

    def __init__(self, s_shape, t_shape, k=0.5, use_bn=True):
        super().__init__()
        in_channel = s_shape[1]
        out_channel = int(t_shape[1] * k)
        self.encoder = _ft_stack(nn.Conv2d, [in_channel, in_channel, out_channel, out_channel], use_bn)

    def forward(self, f_s):
        return self.encoder(f_s)


class Connector(nn.Module):
    """AB's connectors: map each student map onto the shape of the teacher map it meets.

    One entry per pair of ``s_shapes``/``t_shapes``: the identity (an empty Sequential,
    no parameters) when channels and height already agree, else ``ConvReg(s, t,
    use_relu=False)`` (convolution + BN; a ReLU would remove the sign that AB transfers).
    ``forward(g_s)`` returns the list of mapped maps. Pairs the reference cannot connect
    (unequal list lengths, a student map smaller than the teacher's other than by 2x)
    raise ``ValueError``; ``distiller_zoo.AB.check_ab_pair`` says so in one line first.
    """

    def __init__(self, s_shapes, t_shapes):
        super().__init__()
        self.s_shapes = s_shapes
        self.t_shapes = t_shapes
        self.connectors = nn.ModuleList(self._make_connectors(s_shapes, t_shapes))

    @staticmethod
    def _make_connectors(s_shapes, t_shapes):
        if len(s_shapes) != len(t_shapes):
            raise ValueError('unequal length of feat list: {} vs {}'.format(len(s_shapes), len(t_shapes)))
        connectors = []
        for s, t in zip(s_shapes, t_shapes):
            if s[1] == t[1] and s[2] == t[2]:
                connectors.append(nn.Sequential())
            elif s[2] < t[2] and 2 * s[2] != t[2]:
                # ConvReg would pool the teacher here, which the one-argument form cannot
                raise ValueError('no connector from a {}x{} map to a {}x{} map'.format(s[2], s[3], t[2], t[3]))
            else:
                connectors.append(ConvReg(s, t, use_relu=False))
        return connectors

    def forward(self, g_s):
        return [connector(f) for connector, f in zip(self.connectors, g_s)]
