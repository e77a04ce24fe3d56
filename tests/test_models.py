"""The whole model zoo against the reference zoo described in tests/models.json.

For every json entry: parameter count, state_dict names and shapes (so checkpoints written by
the reference code load with strict=True), feature and logit shapes of one forward, and a
strict load of a checkpoint built from the json's names and shapes. ``ResNet18Double`` and
``resnet34x4`` are the exception (see the json's ``_notes``): we build the widths their
names promise, so they are checked against ResNet18 / ResNet34 instead.
"""
import io
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from models import build_model, model_dict

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'models.json')) as f:
    REFERENCE = json.load(f)['models']

# entries whose reference widths are a bug we fix: name -> (base network, width factor)
WIDENED = {'ResNet18Double': ('ResNet18', 2), 'resnet34x4': ('ResNet34', 4)}
ENTRIES = [name for name in REFERENCE if name not in WIDENED]
CIFAR_ENTRIES = [name for name in ENTRIES if REFERENCE[name]['input'] == [3, 32, 32]]


def registry_name(entry):
    # the json tells the two ResNet50s apart; the registry does it by data set
    return 'ResNet50' if entry == 'ResNet50 (CIFAR)' else entry


def build(entry, num_classes=None):
    spec = REFERENCE[entry]
    n = spec['num_classes'] if num_classes is None else num_classes
    return build_model(registry_name(entry), n, dataset=spec['dataset'])


def classifier(model):
    """The final Linear (or Sequential ending in one) that maps the pooled vector to logits."""
    for attr in ('fc', 'linear', 'classifier'):
        head = getattr(model, attr, None)
        if isinstance(head, (torch.nn.Linear, torch.nn.Sequential)):
            return head
    raise AssertionError('no fc/linear/classifier attribute on {}'.format(type(model).__name__))


def reference_checkpoint(state_shapes, value=0.5, count=7):
    """A {'model': state_dict} with the json's names and shapes, each tensor filled with one value.

    The tensors are stride-0 views of a scalar, so even the 133M-parameter VGG costs nothing
    to save and load.
    """
    state = {}
    for name, shape in state_shapes.items():
        if name.endswith('num_batches_tracked'):
            state[name] = torch.tensor(count, dtype=torch.long).expand(shape)
        else:
            state[name] = torch.tensor(value).expand(shape)
    return {'model': state}


def test_registry_is_the_reference_zoo():
    expected = {registry_name(entry) for entry in REFERENCE}
    aliases = {'ResNet50_cifar', 'ResNet50_imagenet'}
    assert expected - set(model_dict) == set(), 'reference models missing from model_dict'
    assert set(model_dict) - expected - aliases == set(), 'registered models not in tests/models.json'


@pytest.mark.parametrize('entry', ENTRIES)
def test_matches_reference(entry, capsys):
    spec = REFERENCE[entry]
    torch.manual_seed(0)
    model = build(entry).eval()
    assert capsys.readouterr().out == '', 'building a model must print nothing'

    assert sum(p.numel() for p in model.parameters()) == spec['params']
    state = model.state_dict()
    missing = set(spec['state_dict']) - set(state)
    unexpected = set(state) - set(spec['state_dict'])
    assert not missing and not unexpected, 'missing {}, unexpected {}'.format(
        sorted(missing)[:5], sorted(unexpected)[:5])
    wrong = {name: (list(state[name].shape), shape) for name, shape in spec['state_dict'].items()
             if list(state[name].shape) != shape}
    assert not wrong, 'shape (ours, reference): {}'.format(wrong)

    x = torch.randn(2, *spec['input'])
    with torch.no_grad():
        feats, logits = model(x, is_feat=True)
        assert [list(f.shape) for f in feats] == spec['feat_shapes']
        assert list(logits.shape) == spec['logits_shape']
        assert torch.isfinite(logits).all()
        # the last feature is the vector the classifier sees
        torch.testing.assert_close(classifier(model)(feats[-1]), logits)
        # the plain call gives the same logits, alone; the 224x224 networks are checked at
        # 64x64 (they all pool adaptively) to spare a second full-size forward
        small = x if spec['input'] == [3, 32, 32] else torch.randn(1, 3, 64, 64)
        plain = model(small)
        assert isinstance(plain, torch.Tensor)
        torch.testing.assert_close(plain, logits if small is x else model(small, is_feat=True)[1])

    buffer = io.BytesIO()
    torch.save(reference_checkpoint(spec['state_dict']), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model.load_state_dict(checkpoint['model'], strict=True)
    assert all(bool((p == 0.5).all()) for p in model.parameters()), 'strict load did not copy the weights'


@pytest.mark.parametrize('entry', ENTRIES)
def test_num_classes_sets_the_classifier_width(entry):
    spec = REFERENCE[entry]
    # on the meta device: shapes only, no memory, no initialisation and no arithmetic
    with torch.device('meta'):
        model = build(entry, num_classes=10).eval()
        logits = model(torch.empty(2, *spec['input']))
    assert logits.shape == (2, 10)
    state = model.state_dict()
    assert set(state) == set(spec['state_dict'])
    changed = [name for name, shape in spec['state_dict'].items() if list(state[name].shape) != shape]
    weight, bias = list(state)[-2:]
    assert sorted(changed) == sorted([weight, bias])
    assert state[weight].shape[0] == 10 and list(state[bias].shape) == [10]


@pytest.mark.parametrize('name', sorted(WIDENED))
def test_widened_resnets_multiply_every_stage(name):
    base_name, factor = WIDENED[name]
    # shapes only (the meta device): resnet34x4 has some 340M parameters
    with torch.device('meta'):
        x = torch.empty(2, 3, 224, 224)
        base_feats, _ = model_dict[base_name](num_classes=1000)(x, is_feat=True)
        feats, logits = model_dict[name](num_classes=1000)(x, is_feat=True)
    assert len(feats) == len(base_feats) == 6
    assert logits.shape == (2, 1000)
    # stages 1-4 and the pooled vector: same size, `factor` times the channels
    for f, b in zip(feats[1:], base_feats[1:]):
        assert f.shape[1] == factor * b.shape[1]
        assert f.shape[2:] == b.shape[2:]


def test_mobilenetv2_prints_nothing(capsys):
    model_dict['MobileNetV2'](num_classes=100)
    captured = capsys.readouterr()
    assert captured.out == '' and captured.err == ''


def test_unknown_model_name_raises_keyerror_listing_valid_names():
    with pytest.raises(KeyError) as info:
        build_model('resnet9000', 100, dataset='cifar100')
    message = str(info.value)
    assert 'resnet9000' in message
    for valid in ('resnet8x4', 'wrn_40_2', 'ShuffleV2', 'vgg13_imagenet'):
        assert valid in message


@pytest.mark.parametrize('dataset,cifar', [('cifar100', True), ('imagenet', False)])
def test_resnet50_is_chosen_by_dataset(dataset, cifar):
    with torch.device('meta'):
        model = build_model('ResNet50', 100, dataset=dataset)
        expected = model_dict['ResNet50_cifar' if cifar else 'ResNet50_imagenet'](num_classes=100)
    assert type(model) is type(expected)
    state = model.state_dict()
    assert list(state['conv1.weight'].shape) == ([64, 3, 3, 3] if cifar else [64, 3, 7, 7])
    assert ('linear.weight' in state) == cifar and ('fc.weight' in state) != cifar
    assert list(state['linear.weight' if cifar else 'fc.weight'].shape) == [100, 2048]
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.state_dict().items()}


# ---- pre-activation features (CIFAR families) ----

def feats_both_ways(model, x):
    with torch.no_grad():
        post, logits = model(x, is_feat=True)
        pre, logits_pre = model(x, is_feat=True, preact=True)
    assert [p.shape for p in pre] == [p.shape for p in post]
    torch.testing.assert_close(logits_pre, logits)
    torch.testing.assert_close(pre[-1], post[-1])
    return pre, post


@pytest.mark.parametrize('name', ['resnet8', 'resnet8x4', 'vgg8', 'ShuffleV1'])
def test_preact_features_are_the_stage_outputs_before_relu(name):
    torch.manual_seed(0)
    model = model_dict[name](num_classes=100).eval()
    pre, post = feats_both_ways(model, torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(pre[0], post[0])
    for p, q in zip(pre[1:-1], post[1:-1]):
        assert (p < 0).any(), 'a pre-activation map has negative values'
        torch.testing.assert_close(F.relu(p), q)


def test_shufflev2_preact_is_the_unshuffled_sum_before_relu():
    torch.manual_seed(0)
    model = model_dict['ShuffleV2'](num_classes=100).eval()
    pre, post = feats_both_ways(model, torch.randn(2, 3, 32, 32))
    for p, q in zip(pre[1:-1], post[1:-1]):
        assert (p < 0).any()
        # the output is relu(pre) with the two halves interleaved channel by channel
        n, c, h, w = p.shape
        shuffled = F.relu(p).view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        torch.testing.assert_close(shuffled, q)


def test_wrn_preact_applies_the_next_batch_norm():
    torch.manual_seed(0)
    model = model_dict['wrn_16_2'](num_classes=100).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
        pre, post = feats_both_ways(model, torch.randn(2, 3, 32, 32))
        next_bns = [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
        for p, q, bn in zip(pre[1:4], post[1:4], next_bns):
            torch.testing.assert_close(p, bn(q))
            assert not torch.allclose(p, q)


def test_mobilenetv2_ignores_preact():
    torch.manual_seed(0)
    model = model_dict['MobileNetV2'](num_classes=100).eval()
    pre, post = feats_both_ways(model, torch.randn(2, 3, 32, 32))
    for p, q in zip(pre, post):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize('name', ['resnet8', 'wrn_16_1', 'vgg8', 'MobileNetV2', 'ShuffleV1', 'ShuffleV2'])
def test_cifar_models_train_one_step(name):
    # gradients reach every parameter through the feature path the methods use
    torch.manual_seed(0)
    model = model_dict[name](num_classes=10).train()
    feats, logits = model(torch.randn(4, 3, 32, 32), is_feat=True)
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])) + sum(f.pow(2).mean() for f in feats[1:-1])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- numbers from the reference code ----

def seeded_state(state_shapes, seed=0):
    """Deterministic, well-scaled weights for the json's names and shapes, drawn in the json's
    order, so the reference's models and ours receive the same tensors."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in state_shapes.items():
        if name.endswith('num_batches_tracked'):
            state[name] = torch.tensor(0)
        elif name.endswith('running_var') or (len(shape) == 1 and name.endswith('weight')):
            state[name] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 1:  # biases and running means
            state[name] = 0.1 * torch.randn(shape, generator=g)
        else:  # conv and linear weights, He-scaled by fan-in
            gain = 2.0 if len(shape) == 4 else 1.0
            state[name] = torch.randn(shape, generator=g) * math.sqrt(gain / math.prod(shape[1:]))
    return state


def summary(t):
    """Mean and a position-weighted mean: the second one changes when channels or pixels move."""
    t = t.double()
    ramp = torch.linspace(-1, 1, t.numel(), dtype=torch.float64).view(t.shape)
    return [t.mean().item(), (t * ramp).mean().item()]


# Computed once with the SemCKD repo's models (RepDistiller's models/resnetv2.py for the CIFAR
# ResNet50) loaded with seeded_state(json state_dict), in eval mode, on
# torch.randn(2, 3, size, size, generator=seeded 1): summary() of every feature (and of every
# pre-activation feature where the reference has them) and the first five logits of image 0.
GOLDEN = {
    'resnet8x4': {
        'size': 32,
        'feats': [[0.6087282, 0.01059339], [1.036839, 0.0006291988], [1.553739, -0.03847418],
                  [2.489583, 0.0320463], [2.489583, 0.03203643]],
        'preact': [[0.6087282, 0.01059339], [0.04608396, 0.01859213], [-0.2665377, -0.06911009],
                   [-0.2484291, 0.03558866], [2.489583, 0.03203643]],
        'logits': [-3.654756, 1.926105, -2.969028, -0.0692907, -2.970587],
    },
    'resnet20': {
        'size': 32,
        'feats': [[0.5650484, -0.0009977455], [1.605115, 0.1228899], [7.388959, -0.3583448],
                  [17.71651, -0.8270072], [17.71651, -0.8300969]],
        'preact': [[0.5650484, -0.0009977455], [1.128649, 0.1653964], [5.068627, -0.215502],
                   [8.941163, -0.4484447], [17.71651, -0.8300969]],
        'logits': [35.56104, 2.276952, -12.58139, -36.84578, 17.02099],
    },
    'wrn_16_1': {
        'size': 32,
        'feats': [[0.005119587, -0.0007978028], [-0.794482, 0.0319814], [0.5339514, -0.02913969],
                  [1.254608, -0.4074537], [5.697808, -0.3857115]],
        'preact': [[0.005119587, -0.0007978028], [-0.8298629, 0.06326561], [0.5403785, 0.03430199],
                   [1.491474, -0.4379761], [5.697808, -0.3857115]],
        'logits': [-2.201703, -2.848824, 1.096596, -15.84263, 3.903643],
    },
    'wrn_16_2': {
        'size': 32,
        'feats': [[0.005119587, -0.0007978028], [-0.9150066, 0.04480754], [0.185645, 0.05303002],
                  [0.1832558, -0.1962264], [4.073134, -0.06934068]],
        'preact': [[0.005119587, -0.0007978028], [-1.007796, 0.06369979], [0.3686615, 0.04543659],
                   [0.2169822, -0.1435788], [4.073134, -0.06934068]],
        'logits': [-3.702691, 1.932997, 4.391521, 4.421453, -1.266753],
    },
    'vgg8': {
        'size': 32,
        'feats': [[0.5678072, -0.007918755], [1.027512, 0.04309669], [1.165556, 0.01379734],
                  [1.533916, 0.008129422], [1.534197, 0.02293367], [1.534197, 0.02291997]],
        'preact': [[0.5678072, -0.007918755], [-0.06589905, 0.09261449], [-0.4765852, -0.0111278],
                   [0.06472584, 0.0250443], [0.04860915, 0.06752254], [1.534197, 0.02291997]],
        'logits': [-0.3645919, 1.993714, 2.364614, -2.915085, 8.056039],
    },
    'vgg11': {
        'size': 32,
        'feats': [[0.5678072, -0.007918755], [1.027512, 0.04309669], [1.169339, 0.01614895],
                  [1.556271, 0.00896772], [1.496826, -0.009113971], [1.496826, -0.009122507]],
        'preact': [[0.5678072, -0.007918755], [-0.06589905, 0.09261449], [-0.0623645, 0.0521824],
                   [0.1596564, 0.06204247], [0.01589581, 0.001628571], [1.496826, -0.009122507]],
        'logits': [0.01454138, 3.344343, 0.5719936, 3.251591, -4.454274],
    },
    'MobileNetV2': {
        'size': 32,
        'feats': [[0.5723687, -0.009289448], [0.3879353, -0.2851955], [-2.06689, 0.4455773],
                  [-125.4417, -125.8848], [-352.5673, 104.2428], [4186.224, 44.93192]],
        'preact': [[0.5723687, -0.009289448], [0.3879353, -0.2851955], [-2.06689, 0.4455773],
                   [-125.4417, -125.8848], [-352.5673, 104.2428], [4186.224, 44.93192]],
        'logits': [-18123.28, -3194.679, -404.0113, 1037.537, -990.5394],
    },
    'ShuffleV1': {
        'size': 32,
        'feats': [[0.5173385, -0.02359218], [2.824406, 0.1456632], [99.75009, 3.639168],
                  [307.2673, -18.24926], [307.2673, -18.25946]],
        'preact': [[0.5173385, -0.02359218], [1.345505, 0.01715682], [62.43517, 2.152199],
                   [213.3439, -19.38032], [307.2673, -18.25946]],
        'logits': [-472.697, -181.0331, 540.785, 25.37406, 16.46188],
    },
    'ShuffleV2': {
        'size': 32,
        'feats': [[0.5173385, -0.02359218], [2.9343, 0.07743884], [80.41615, 1.458751],
                  [275.6823, -14.39268], [337.6539, -6.356424]],
        'preact': [[0.5173385, -0.02359218], [1.612763, 0.04333862], [7.830886, -5.992223],
                   [103.113, -34.23751], [337.6539, -6.356424]],
        'logits': [641.0321, -19.97293, -860.4788, 31.9489, -358.4548],
    },
    'ResNet50 (CIFAR)': {
        'size': 32,
        'feats': [[0.6051483, -0.0002749765], [3.07461, 0.01324472], [19.3907, 0.1675367],
                  [429.4792, -3.668999], [1835.347, -9.129524], [1835.347, -9.136818]],
        'preact': [[0.6051483, -0.0002749765], [2.037119, 0.07004482], [11.83895, 0.5620031],
                   [252.6212, -0.003358319], [1140.649, -0.7703717], [1835.347, -9.136818]],
        'logits': [-1240.345, 2719.271, 1339.913, 735.1199, 2169.374],
    },
    'ResNet18': {
        'size': 64,
        'feats': [[2.014566, -0.01635305], [3.549704, -0.0540115], [6.770252, -0.1819593],
                  [14.76331, -0.215883], [19.82638, -0.0649877], [19.82638, -0.06547551]],
        'logits': [11.77325, -10.23275, -21.23978, 17.14316, 41.01756],
    },
    'MobileNetV2_Imagenet': {
        'size': 64,
        'feats': [[0.6028156, 0.01030594], [0.8199132, 0.1296846], [0.5534152, -0.4084565],
                  [-0.01450426, -0.02783688], [-0.1178216, 0.007717353], [1.449417, -0.01000204]],
        'logits': [1.528785, -0.6429927, 2.944976, 2.827413, -1.273198],
    },
    'ShuffleV2_Imagenet': {
        'size': 64,
        'feats': [[2.368724, 0.001544321], [7.338297, 0.02708827], [58.92185, 0.03244859],
                  [135.8984, -0.4971997], [148.0152, -1.02131]],
        'logits': [-153.2239, -58.70087, 191.8063, -199.2831, 145.1651],
    },
}


@pytest.mark.parametrize('entry', sorted(GOLDEN))
def test_forward_matches_reference_numbers(entry):
    golden = GOLDEN[entry]
    model = build(entry).eval()
    model.load_state_dict(seeded_state(REFERENCE[entry]['state_dict']), strict=True)
    x = torch.randn(2, 3, golden['size'], golden['size'], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, logits = model(x, is_feat=True)
        torch.testing.assert_close([summary(f) for f in feats], golden['feats'], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits[0, :5].tolist(), golden['logits'], rtol=1e-4, atol=1e-5)
        if 'preact' in golden:
            pre, _ = model(x, is_feat=True, preact=True)
            torch.testing.assert_close([summary(f) for f in pre], golden['preact'], rtol=1e-4, atol=1e-5)
