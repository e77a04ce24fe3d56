"""ReviewKD, CAT-KD and SimKD pieces, and the classifier / pooling accessors they use.

Every formula is checked against an independent float64 computation (explicit loops over
pooling windows and pyramid levels, einsums over weights and maps, convolutions and batch
norm written out by hand), on real features of resnet32x4 -> resnet8x4 where features
matter; shapes and channels against the reference's per-pair table for every pair it
lists; gradients against what they must and must not reach (never the teacher, never a
frozen classifier).
"""
import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

from distiller_zoo.CATKD import CAT_loss, class_activation_maps, drop_classifier_bias, pair_config
from distiller_zoo.ReviewKD import (ABF, REFERENCE_SHAPES, ReviewKD, hcl_loss, pair_weight, review_config,
                                    student_levels, teacher_levels, warmup_factor)
from distiller_zoo.SimKD import SimKD, student_prediction
from helper.errors import UserError
from models import build_model
from models.util import PoolInput, get_classifier, get_global_pool

# the CIFAR families and the attribute path of each one's classifier (the ground truth
# get_classifier must find)
CIFAR_FAMILIES = {
    'resnet': 'fc', 'resnetv2': 'linear', 'wrn': 'fc', 'vgg': 'classifier',
    'mobilenetv2': 'classifier.0', 'ShuffleNetv1': 'linear', 'ShuffleNetv2': 'linear',
}
BATCH = 4


def cifar_models():
    names = []
    for family, path in CIFAR_FAMILIES.items():
        for name in importlib.import_module('models.' + family).__all__:
            names.append((name, path))
    return names


@functools.lru_cache(maxsize=None)
def built(name):
    torch.manual_seed(0)
    # 'ResNet50' for CIFAR is ResNet50_cifar; build it once
    return build_model('ResNet50_cifar' if name == 'ResNet50' else name, 100, dataset='cifar100').eval()


@functools.lru_cache(maxsize=None)
def probe(name, preact=False):
    """One eval-mode pass of a network at batch 2: the model, feats, logits, pool input."""
    model = built(name)
    hook = PoolInput(model)
    with torch.no_grad():
        feats, logits = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                              is_feat=True, preact=preact)
    hook.remove()
    return model, feats, logits, hook.feature


def close(a, b, rtol=1e-4, atol=1e-6):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().item() + 1.0
    err = (a - b).abs().max().item()
    assert err <= atol + rtol * scale, (err, scale)


# ---------------------------------------------------------------- float64 references

def pool_ref(x, size):
    """Adaptive average pooling to size x size, window by window."""
    x = x.double()
    H, W = x.shape[2], x.shape[3]
    out = torch.empty(x.shape[0], x.shape[1], size, size, dtype=torch.float64)
    for i in range(size):
        h0, h1 = (i * H) // size, -((-(i + 1) * H) // size)
        for j in range(size):
            w0, w1 = (j * W) // size, -((-(j + 1) * W) // size)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(dim=(2, 3))
    return out


def mse_ref(a, b):
    return ((a.double() - b.double()) ** 2).sum().item() / a.numel()


def hcl_ref(fstudent, fteacher):
    """Per level: (MSE + sum_k 2^-k MSE of the k-th pyramid pool below H) / (1 + sum_k 2^-k)."""
    total = 0.0
    for fs, ft in zip(fstudent, fteacher):
        sizes = [s for s in (4, 2, 1) if s < fs.shape[2]]
        weights = [0.5 ** (k + 1) for k in range(len(sizes))]
        value = mse_ref(fs, ft)
        for w, s in zip(weights, sizes):
            value += w * mse_ref(pool_ref(fs, s), pool_ref(ft, s))
        total += value / (1.0 + sum(weights))
    return total


def conv1x1_ref(x, weight, bias=None):
    out = torch.einsum('nchw,oc->nohw', x.double(), weight.double().reshape(weight.shape[0], -1))
    return out if bias is None else out + bias.double()[None, :, None, None]


def conv3x3_ref(x, weight):
    """3x3, stride 1, zero padding 1, no bias: nine shifted 1x1 products."""
    H, W = x.shape[2], x.shape[3]
    xp = F.pad(x.double(), (1, 1, 1, 1))
    out = 0
    for i in range(3):
        for j in range(3):
            out = out + torch.einsum('nchw,oc->nohw', xp[:, :, i:i + H, j:j + W], weight.double()[:, :, i, j])
    return out


def bn_train_ref(x, bn):
    """BatchNorm with the batch's statistics (biased variance), as in training mode."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.double()[None, :, None, None] \
        + bn.bias.double()[None, :, None, None]


def nearest_ref(x, size):
    """Nearest resize to size x size: output i reads input floor(i * H / size)."""
    H = x.shape[2]
    idx = [(i * H) // size for i in range(size)]
    return x[:, :, idx][:, :, :, idx]


def linear_ref(x, layer):
    return torch.einsum('nc,kc->nk', x.double(), layer.weight.double()) + layer.bias.double()


# ---------------------------------------------------------------- a real pair

@pytest.fixture(scope='module')
def teacher():
    torch.manual_seed(1)
    model = build_model('resnet32x4', 100, dataset='cifar100').eval()
    for p in model.parameters():
        p.requires_grad_(False)
    hook = PoolInput(model)
    x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feat_post, logit = model(x, is_feat=True)
        pool_input = hook.feature
        feat_pre, _ = model(x, is_feat=True, preact=True)
    return dict(model=model, x=x, feat=feat_post, feat_pre=feat_pre, logit=logit, pool_input=pool_input)


def student_pass(x):
    """A fresh resnet8x4 in training mode, its features with their graph, and its pool input."""
    torch.manual_seed(3)
    model = build_model('resnet8x4', 100, dataset='cifar100').train()
    hook = PoolInput(model)
    feats, logits = model(x, is_feat=True)
    return model, feats, logits, hook.feature


# ---------------------------------------------------------------- accessors

@pytest.mark.parametrize('name,path', cifar_models())
def test_get_classifier_and_pool_input_every_cifar_model(name, path):
    model, feats, logits, pool_input = probe(name)
    layer = get_classifier(model)
    assert layer is model.get_submodule(path)
    # the classifier maps the pooled vector to the logits, and the pool input averages to it
    close(logits, linear_ref(feats[-1], layer))
    close(feats[-1], pool_input.double().mean(dim=(2, 3)))
    assert pool_input.shape[1] == layer.in_features


def test_global_pool_refuses_networks_without_one():
    with pytest.raises(UserError, match='global average pooling'):
        get_global_pool(build_model('MobileNetV2_Imagenet', 10))


# ---------------------------------------------------------------- ReviewKD

def test_hcl_loss_against_explicit_pyramid():
    g = torch.Generator().manual_seed(4)
    # heights 1 (no pyramid), 2 (1x1 only), 4 (2, 1), 6 (uneven 4x4 windows), 8 (4, 2, 1)
    shapes = [(3, 5, 1, 1), (3, 4, 2, 2), (3, 6, 4, 4), (3, 2, 6, 6), (3, 3, 8, 8)]
    fs = [torch.randn(s, generator=g) for s in shapes]
    ft = [torch.randn(s, generator=g) for s in shapes]
    value = hcl_loss(fs, ft)
    assert value.dim() == 0
    close(value, hcl_ref(fs, ft))
    # one level alone: an 8x8 map weighs its pools 1/2, 1/4, 1/8 and divides by 1.875
    manual = (mse_ref(fs[4], ft[4]) + 0.5 * mse_ref(pool_ref(fs[4], 4), pool_ref(ft[4], 4))
              + 0.25 * mse_ref(pool_ref(fs[4], 2), pool_ref(ft[4], 2))
              + 0.125 * mse_ref(pool_ref(fs[4], 1), pool_ref(ft[4], 1))) / 1.875
    close(hcl_loss(fs[4:], ft[4:]), manual)


def test_abf_against_hand_computation():
    torch.manual_seed(5)
    abf = ABF(6, 5, 7, fuse=True).train()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 4, 4, generator=g)
    y = torch.randn(2, 5, 2, 2, generator=g)
    out, fused = abf(x, y, shape=4, out_shape=8)

    a = bn_train_ref(conv1x1_ref(x, abf.conv1[0].weight), abf.conv1[1])
    y_up = nearest_ref(y.double(), 4)
    att = torch.sigmoid(conv1x1_ref(torch.cat([a, y_up], 1), abf.att_conv[0].weight, abf.att_conv[0].bias))
    f = a * att[:, 0:1] + y_up * att[:, 1:2]
    f = nearest_ref(f, 8)
    close(fused, f)
    close(out, bn_train_ref(conv3x3_ref(f, abf.conv2[0].weight), abf.conv2[1]))

    # the deepest level has no attention and keeps its size
    first = ABF(6, 5, 7, fuse=False).train()
    assert first.att_conv is None
    out, fused = first(x, out_shape=4)
    a = bn_train_ref(conv1x1_ref(x, first.conv1[0].weight), first.conv1[1])
    close(fused, a)
    close(out, bn_train_ref(conv3x3_ref(a, first.conv2[0].weight), first.conv2[1]))


def _table_row(pair):
    row = REFERENCE_SHAPES[pair]
    n = len(row['in_channels'])
    shapes = row['shapes'][:n]      # the reference's zip stops at the ABFs
    out_shapes = shapes if row['out_shapes'] is None else row['out_shapes'][:n]
    return dict(in_channels=row['in_channels'], out_channels=row['out_channels'], shapes=shapes,
                out_shapes=out_shapes)


@pytest.mark.parametrize('pair', sorted(REFERENCE_SHAPES))
def test_review_config_reproduces_reference_table(pair):
    model_t, model_s = pair
    _, feat_t, _, _ = probe(model_t, preact=True)
    _, feat_s, _, _ = probe(model_s)
    assert review_config(feat_s, feat_t) == _table_row(pair)


def test_review_config_refuses_a_shallower_student():
    _, feat_t, _, _ = probe('ResNet50', preact=True)
    _, feat_s, _, _ = probe('resnet8')
    with pytest.raises(UserError, match='ReviewKD'):
        review_config(feat_s[1:], feat_t)


def test_reviewkd_on_real_pair_shapes_names_loss_gradients(teacher):
    model_s, feat_s, _, _ = student_pass(teacher['x'])
    config = review_config(feat_s, teacher['feat_pre'])
    assert config == _table_row(('resnet32x4', 'resnet8x4'))
    torch.manual_seed(7)
    review = ReviewKD(**config).train()

    names = [k for k in review.state_dict()]
    expected = []
    for i in range(4):
        expected += ['abfs.{}.conv1.0.weight'.format(i)]
        expected += ['abfs.{}.conv1.1.{}'.format(i, k) for k in
                     ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]
        expected += ['abfs.{}.conv2.0.weight'.format(i)]
        expected += ['abfs.{}.conv2.1.{}'.format(i, k) for k in
                     ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]
        if i > 0:
            expected += ['abfs.{}.att_conv.0.weight'.format(i), 'abfs.{}.att_conv.0.bias'.format(i)]
    assert sorted(names) == sorted(expected)
    # abfs.0 reads the pooled vector (256 -> mid 256 -> 256); abfs.3 the first stage (64 -> 64)
    assert tuple(review.abfs[0].conv1[0].weight.shape) == (256, 256, 1, 1)
    assert tuple(review.abfs[3].conv1[0].weight.shape) == (256, 64, 1, 1)
    assert tuple(review.abfs[3].conv2[0].weight.shape) == (64, 256, 3, 3)

    results = review(feat_s)
    targets = teacher_levels(teacher['feat_pre'])
    assert [tuple(r.shape) for r in results] == [tuple(t.shape) for t in targets] == [
        (BATCH, 64, 32, 32), (BATCH, 128, 16, 16), (BATCH, 256, 8, 8), (BATCH, 256, 1, 1)]
    # the targets are the teacher's pre-activation maps (some negative), the pooled vector last
    assert targets[0].min() < 0
    close(targets[-1].flatten(1), teacher['feat_pre'][-1])

    loss = hcl_loss(results, targets)
    close(loss, hcl_ref(results, targets))
    (loss * warmup_factor(1)).backward()
    assert model_s.conv1.weight.grad.abs().sum() > 0
    assert model_s.layer3[0].conv2.weight.grad.abs().sum() > 0
    for name, p in review.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher['model'].parameters())


def test_student_levels_keep_the_stem_and_make_the_vector_a_map(teacher):
    levels = student_levels(teacher['feat'])
    assert len(levels) == len(teacher['feat'])
    assert levels[0] is teacher['feat'][0]
    assert tuple(levels[-1].shape) == (BATCH, 256, 1, 1)


def test_reviewkd_warmup_and_weights():
    # mdistiller: min(epoch / 20, 1) with 1-based epochs
    assert [warmup_factor(e) for e in (1, 10, 20, 21, 240)] == [0.05, 0.5, 1.0, 1.0, 1.0]
    assert pair_weight('resnet32x4', 'resnet8x4') == 5.0
    assert pair_weight('resnet32x4', 'ShuffleV2') == 8.0
    assert pair_weight('resnet56', 'resnet20') == 0.6
    assert pair_weight('vgg13', 'vgg8') == 1.0      # no published value: the code's default


# ---------------------------------------------------------------- CAT-KD

def cat_ref(cam_s, cam_t, resolution, normalize):
    ps, pt = pool_ref(cam_s, resolution), pool_ref(cam_t, resolution)
    if normalize:
        ps = ps / ps.pow(2).sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-12)
        pt = pt / pt.pow(2).sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    return mse_ref(ps, pt)


def test_cams_are_the_classifier_at_every_position(teacher):
    model_t = teacher['model']
    fc = get_classifier(model_t)
    cam = class_activation_maps(teacher['pool_input'], fc.weight)
    assert tuple(cam.shape) == (BATCH, 100, 8, 8)
    close(cam, torch.einsum('nchw,kc->nkhw', teacher['pool_input'].double(), fc.weight.double()))
    # resnet's pool input is its last stage map; the CAMs' spatial mean plus the bias are the logits
    assert torch.equal(teacher['pool_input'], teacher['feat'][-2])
    close(cam.double().mean(dim=(2, 3)) + fc.bias.double(), teacher['logit'])


def test_student_without_bias_predicts_its_pooled_cams(teacher):
    model_s, _, _, _ = student_pass(teacher['x'])
    drop_classifier_bias(model_s)
    bias = get_classifier(model_s).bias
    assert not bias.requires_grad and torch.count_nonzero(bias) == 0
    hook = PoolInput(model_s)
    logits = model_s(teacher['x'])
    cam = class_activation_maps(hook.feature, get_classifier(model_s).weight)
    close(logits, cam.double().mean(dim=(2, 3)))


@pytest.mark.parametrize('resolution,normalize', [(2, False), (2, True), (4, True), (1, False)])
def test_cat_loss_against_explicit_pooling(teacher, resolution, normalize):
    model_s, _, _, pool_s = student_pass(teacher['x'])
    cam_s = class_activation_maps(pool_s, get_classifier(model_s).weight)
    cam_t = class_activation_maps(teacher['pool_input'], get_classifier(teacher['model']).weight)
    value = CAT_loss(cam_s, cam_t, resolution, normalize)
    assert value.dim() == 0
    close(value, cat_ref(cam_s, cam_t, resolution, normalize))


def test_cat_loss_uneven_windows():
    g = torch.Generator().manual_seed(8)
    cam_s, cam_t = torch.randn(2, 5, 7, 7, generator=g), torch.randn(2, 5, 7, 7, generator=g)
    for resolution in (2, 4):
        for normalize in (False, True):
            close(CAT_loss(cam_s, cam_t, resolution, normalize), cat_ref(cam_s, cam_t, resolution, normalize))


def test_cat_gradients_reach_student_and_its_classifier_never_the_teacher(teacher):
    model_s, _, _, pool_s = student_pass(teacher['x'])
    drop_classifier_bias(model_s)
    fc_s = get_classifier(model_s)
    with torch.no_grad():
        cam_t = class_activation_maps(teacher['pool_input'], get_classifier(teacher['model']).weight)
    loss = 15.0 * CAT_loss(class_activation_maps(pool_s, fc_s.weight), cam_t, 2, False)
    loss.backward()
    assert fc_s.weight.grad.abs().sum() > 0
    assert model_s.conv1.weight.grad.abs().sum() > 0
    assert fc_s.bias.grad is None
    assert all(p.grad is None for p in teacher['model'].parameters())


def test_cat_pair_configs():
    assert pair_config('resnet32x4', 'resnet8x4') == dict(weight=15.0, resolution=2, normalize=False)
    assert pair_config('wrn_40_2', 'ShuffleV1') == dict(weight=80.0, resolution=4, normalize=True)
    assert pair_config('resnet32x4', 'vgg8') == dict(weight=400.0, resolution=2, normalize=True)


# ---------------------------------------------------------------- SimKD

SIMKD_NAMES = (['transfer.0.weight']
               + ['transfer.1.' + k for k in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]
               + ['transfer.3.weight']
               + ['transfer.4.' + k for k in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]
               + ['transfer.6.weight']
               + ['transfer.7.' + k for k in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')])


def transfer_ref(simkd, x):
    t = simkd.transfer
    h = torch.relu(bn_train_ref(conv1x1_ref(x, t[0].weight), t[1]))
    h = torch.relu(bn_train_ref(conv3x3_ref(h, t[3].weight), t[4]))
    return torch.relu(bn_train_ref(conv1x1_ref(h, t[6].weight), t[7]))


def test_simkd_names_and_shapes():
    simkd = SimKD(s_n=48, t_n=256, factor=2)
    assert list(simkd.state_dict()) == SIMKD_NAMES
    assert tuple(simkd.transfer[0].weight.shape) == (128, 48, 1, 1)
    assert tuple(simkd.transfer[3].weight.shape) == (128, 128, 3, 3)
    assert tuple(simkd.transfer[6].weight.shape) == (256, 128, 1, 1)
    assert tuple(SimKD(s_n=48, t_n=256, factor=4).transfer[3].weight.shape) == (64, 64, 3, 3)


def test_simkd_forward_by_hand_on_real_pair(teacher):
    model_s, feat_s, _, _ = student_pass(teacher['x'])
    feat_t = teacher['feat'][-2]
    # the teacher's classifier reads exactly feat_t[-2] (pooled) for resnet teachers
    assert torch.equal(teacher['pool_input'], feat_t)
    cls_t = get_classifier(teacher['model'])
    torch.manual_seed(9)
    simkd = SimKD(s_n=feat_s[-2].shape[1], t_n=feat_t.shape[1], factor=2).train()
    trans_s, trans_t, pred = simkd(feat_s[-2], feat_t, cls_t)

    expected = transfer_ref(simkd, feat_s[-2])
    close(trans_s, expected)
    assert torch.equal(trans_t, feat_t)
    close(pred, linear_ref(expected.mean(dim=(2, 3)), cls_t))

    # the reference's loss: the element mean of squared differences
    loss = F.mse_loss(trans_s, trans_t)
    close(loss, mse_ref(expected, feat_t))
    # route a gradient through the prediction too: the frozen classifier must not take it
    (loss + 1e-3 * pred.sum()).backward()
    assert model_s.conv1.weight.grad.abs().sum() > 0
    for name, p in simkd.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert cls_t.weight.grad is None and cls_t.bias.grad is None
    # the student's own classifier plays no part
    assert get_classifier(model_s).weight.grad is None

    # test time: the prediction needs only the teacher's height
    simkd.eval()
    with torch.no_grad():
        _, _, pred_eval = simkd(feat_s[-2], feat_t, cls_t)
        close(student_prediction(simkd, feat_s[-2], feat_t.shape[2], cls_t), pred_eval, rtol=1e-6)


@pytest.mark.parametrize('s_H,t_H', [(8, 4), (4, 8), (6, 4)])
def test_simkd_pools_the_taller_map(s_H, t_H):
    g = torch.Generator().manual_seed(10)
    feat_s = torch.randn(3, 6, s_H, s_H, generator=g)
    feat_t = torch.randn(3, 8, t_H, t_H, generator=g)
    cls_t = torch.nn.Linear(8, 5)
    simkd = SimKD(s_n=6, t_n=8).train()
    trans_s, trans_t, pred = simkd(feat_s, feat_t, cls_t)
    size = min(s_H, t_H)
    source = pool_ref(feat_s, size) if s_H > t_H else feat_s.double()
    close(trans_t, pool_ref(feat_t, size) if t_H > s_H else feat_t)
    close(trans_s, transfer_ref(simkd, source))
    assert tuple(pred.shape) == (3, 5)
    simkd.eval()
    with torch.no_grad():
        close(student_prediction(simkd, feat_s, t_H, cls_t), simkd(feat_s, feat_t, cls_t)[2], rtol=1e-6)
