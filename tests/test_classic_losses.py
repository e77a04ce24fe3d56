"""AB, FT, FSP, NST, KDSVD and OFD losses, their modules, and get_bn_before_relu.

Each loss is compared with an independent float64 numpy computation of its formula on the
features of real pairs (resnet32x4 -> resnet8x4, and WRN pairs), built another way:
element-wise case analysis (AB, OFD in the authors' max-form), sums of outer products
(FSP), spatial Gram matrices (NST), eigenvectors of the channel Gram matrix (KDSVD). The
gradient tests follow the references' wiring: the teacher's features come from a no-grad
forward, and the losses' own detaches are checked with a teacher input that asks for a
gradient. The get_bn_before_relu tests capture the BN outputs with hooks and compare them
with the pre-activation features.
"""
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distiller_zoo.AB import ABLoss, check_ab_pair
from distiller_zoo.FSP import FSP, check_fsp_pair
from distiller_zoo.FT import FactorTransfer, init_learning_rate
from distiller_zoo.KDSVD import KDSVD, check_kdsvd_pair
from distiller_zoo.NST import NSTLoss
from distiller_zoo.OFD import ConnectorConvBN, build_feature_connector, feat_loss, get_margin_from_BN
from helper.errors import UserError
from models import model_dict
from models.util import Connector, ConvReg, Paraphraser, Translator

BATCH = 4


def features(name, x, seed, preact):
    """``(feats, model)`` of a freshly initialised ``name`` (eval mode) on ``x``; the BN
    affine parameters are randomised so pre-activation maps have both signs and OFD's
    margins differ per channel."""
    torch.manual_seed(seed)
    model = model_dict[name](num_classes=100).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.normal_(0, 0.5)
        feats, _ = model(x, is_feat=True, preact=preact)
    return feats, model


@pytest.fixture(scope='module')
def res():
    """resnet32x4 (teacher) -> resnet8x4 (student), batch 4, plain and pre-activation maps."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32)
    out = {}
    for role, name, seed in (('t', 'resnet32x4', 1), ('s', 'resnet8x4', 2)):
        out[role], out[role + '_model'] = features(name, x, seed, preact=False)
        out[role + '_pre'], _ = features(name, x, seed, preact=True)
    return out


@pytest.fixture(scope='module')
def wrn():
    """wrn_40_2 (teacher) with the students wrn_16_2 (same widths) and wrn_40_1 (half)."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32)
    out = {}
    for role, name, seed in (('t', 'wrn_40_2', 3), ('s', 'wrn_16_2', 4), ('s1', 'wrn_40_1', 5)):
        out[role], _ = features(name, x, seed, preact=False)
        out[role + '_pre'], _ = features(name, x, seed, preact=True)
    return out


def np64(t):
    return t.detach().double().numpy()


def pool_np(x, size):
    """Average-pool ``(B, C, H, W)`` to ``size x size`` by block means (H a multiple of size)."""
    B, C, H, W = x.shape
    return x.reshape(B, C, size, H // size, size, W // size).mean(axis=(3, 5))


def match_np(s, t):
    """The references' rule: the taller map is pooled to the shorter one's size."""
    if s.shape[2] > t.shape[2]:
        return pool_np(s, t.shape[2]), t
    if s.shape[2] < t.shape[2]:
        return s, pool_np(t, s.shape[2])
    return s, t


def close(value, expected, rtol=1e-4, atol=1e-8):
    assert value.dim() == 0, tuple(value.shape)
    assert math.isclose(value.item(), float(expected), rel_tol=rtol, abs_tol=atol), (value.item(), expected)


def leaves(feats):
    return [f.detach().clone().requires_grad_(True) for f in feats]


# ---------------------------------------------------------------- AB

def ab_ref(g_s, g_t, margin=1.0):
    """Per-layer AB losses, element by element by cases, float64."""
    n = len(g_s)
    out = []
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        s, t = np64(s), np64(t)
        push_down = np.where((t <= 0) & (s > -margin), (s + margin) ** 2, 0.0)
        pull_up = np.where((t > 0) & (s <= margin), (s - margin) ** 2, 0.0)
        out.append(2.0 ** (i - n + 1) * (push_down + pull_up).sum() / s.shape[0] * 3 / 1000)
    return out


@pytest.mark.parametrize('margin', [1.0, 0.5])
def test_ab_loss_per_layer_list(res, margin):
    g_s, g_t = res['s_pre'][1:-1], res['t_pre'][1:-1]
    connector = Connector([f.shape for f in g_s], [f.shape for f in g_t])
    losses = ABLoss(len(g_s), margin=margin)(connector(g_s), g_t)
    expected = ab_ref(g_s, g_t, margin)
    assert len(losses) == 3
    for value, ref in zip(losses, expected):
        close(value, ref, rtol=1e-5)
    assert expected[0] > 0 and expected[-1] > 0


def test_ab_and_ofd_masks_at_the_boundaries():
    """Hand-computed values where the teacher is exactly 0 or exactly at the margin."""
    s = torch.tensor([0.5, -0.5, 2.0, 0.5, -2.0]).reshape(1, 5, 1, 1)
    t = torch.tensor([0.0, 0.0, -1.0, 0.3, 0.3]).reshape(1, 5, 1, 1)
    # off (t <= 0): (s + 1)^2 where s > -1; on (t > 0): (s - 1)^2 where s <= 1
    close(ABLoss(1)([s], [t])[0], (2.25 + 0.25 + 9 + 0.25 + 9) * 3 / 1000, rtol=1e-6)
    s = torch.tensor([0.2, -0.3, -0.8, 0.1, 1.0]).reshape(1, 1, 1, 5)
    t = torch.tensor([0.0, -0.5, -1.0, 0.5, -0.2]).reshape(1, 1, 1, 5)
    margin = torch.full((1, 1, 1, 1), -0.5)
    close(feat_loss(s, t, margin), 0.2 ** 2 + 0.2 ** 2 + 0 + 0.4 ** 2 + 1.2 ** 2, rtol=1e-5)


def test_ab_connector_identity_and_convreg(res, wrn):
    # resnet32x4 -> resnet8x4: same widths and sizes, so every connector is the identity
    g_s, g_t = res['s_pre'][1:-1], res['t_pre'][1:-1]
    connector = Connector([f.shape for f in g_s], [f.shape for f in g_t])
    assert sum(p.numel() for p in connector.parameters()) == 0
    assert all(out is f for out, f in zip(connector(g_s), g_s))

    # wrn_40_2 -> wrn_40_1: half the channels, so ConvReg without ReLU, reference names
    g_s, g_t = wrn['s1_pre'][1:-1], wrn['t_pre'][1:-1]
    connector = Connector([f.shape for f in g_s], [f.shape for f in g_t]).eval()
    keys = {k for k in connector.state_dict() if not k.endswith('num_batches_tracked')}
    assert keys == {'connectors.{}.{}'.format(i, p) for i in range(3)
                    for p in ('conv.weight', 'conv.bias', 'bn.weight', 'bn.bias', 'bn.running_mean',
                              'bn.running_var')}
    with torch.no_grad():
        for reg, f_s, f_t, out in zip(connector.connectors, g_s, g_t, connector(g_s)):
            assert out.shape == f_t.shape
            assert reg.conv.kernel_size == (1, 1)
            expected = F.batch_norm(F.conv2d(f_s, reg.conv.weight, reg.conv.bias), reg.bn.running_mean,
                                    reg.bn.running_var, reg.bn.weight, reg.bn.bias, eps=reg.bn.eps)
            assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
            assert (out < 0).any()  # no ReLU


def test_convreg_one_and_two_argument_forms():
    torch.manual_seed(0)
    reg = ConvReg((2, 8, 8, 8), (2, 16, 4, 4)).eval()
    x, t = torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)
    out, t_out = reg(x, t)
    assert t_out is t
    assert torch.allclose(reg(x), out, rtol=1e-5, atol=1e-6)


def test_ab_gradients_reach_student_and_connector_not_teacher(wrn):
    g_s = leaves(wrn['s1_pre'][1:-1])
    g_t = leaves(wrn['t_pre'][1:-1])  # asks for a gradient: the loss must give it none
    connector = Connector([f.shape for f in g_s], [f.shape for f in g_t])
    sum(ABLoss(len(g_s))(connector(g_s), g_t)).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in g_s)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())
    assert all(f.grad is None for f in g_t)


def test_check_ab_pair():
    check_ab_pair([(2, 16, 16, 16)], [(2, 32, 32, 32)])  # half the size: a transposed conv
    with pytest.raises(UserError, match='student has 4 and the teacher 3'):
        check_ab_pair([(2, 8, 8, 8)] * 4, [(2, 8, 8, 8)] * 3)
    with pytest.raises(UserError, match='4x4') as err:
        check_ab_pair([(2, 8, 4, 4)], [(2, 8, 16, 16)])
    assert '\n' not in str(err.value)


# ---------------------------------------------------------------- FT

def factor_np(f, p1=2):
    a = (f ** p1).mean(axis=1).reshape(f.shape[0], -1)
    return a / np.maximum(np.sqrt((a ** 2).sum(axis=1, keepdims=True)), 1e-12)


def ft_ref(f_s, f_t, p1=2, p2=1):
    s, t = match_np(np64(f_s), np64(f_t))
    d = factor_np(s, p1) - factor_np(t, p1)
    return np.abs(d).mean() if p2 == 1 else (d ** p2).mean()


PARAPHRASER_KEYS = ['encoder.0.weight', 'encoder.0.bias', 'encoder.3.weight', 'encoder.3.bias',
                    'encoder.6.weight', 'encoder.6.bias', 'decoder.0.weight', 'decoder.0.bias',
                    'decoder.3.weight', 'decoder.3.bias', 'decoder.6.weight', 'decoder.6.bias']


def test_paraphraser_and_translator_match_reference_layout(res):
    f_s, f_t = res['s'][-2], res['t'][-2]  # (4, 256, 8, 8) both
    torch.manual_seed(0)
    para = Paraphraser(f_t.shape)
    trans = Translator(f_s.shape, f_t.shape)
    assert list(para.state_dict()) == PARAPHRASER_KEYS
    bn_keys = ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    expected = []
    for i in (0, 3, 6):
        expected += ['encoder.{}.weight'.format(i), 'encoder.{}.bias'.format(i)]
        expected += ['encoder.{}.{}'.format(i + 1, k) for k in bn_keys]
    assert list(trans.state_dict()) == expected
    assert [tuple(para.state_dict()[k].shape) for k in PARAPHRASER_KEYS[::2]] == [
        (256, 256, 3, 3), (128, 256, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3), (128, 256, 3, 3),
        (256, 256, 3, 3)]  # transposed convolutions store (in, out, k, k)

    with torch.no_grad():
        factor, rec = para(f_t)
        assert factor.shape == (BATCH, 128, 8, 8) and rec.shape == f_t.shape
        assert torch.allclose(para(f_t, is_factor=True), factor, rtol=1e-5, atol=1e-6)
        x = f_t
        for i in (0, 3, 6):
            conv = para.encoder[i]
            x = F.leaky_relu(F.conv2d(x, conv.weight, conv.bias, padding=1), 0.1)
        assert torch.allclose(factor, x, rtol=1e-5, atol=1e-6)
        for i in (0, 3, 6):
            conv = para.decoder[i]
            x = F.leaky_relu(F.conv_transpose2d(x, conv.weight, conv.bias, padding=1), 0.1)
        assert torch.allclose(rec, x, rtol=1e-5, atol=1e-6)
        assert trans.eval()(f_s).shape == (BATCH, 128, 8, 8)


def test_factor_transfer_matches_numpy(res):
    torch.manual_seed(0)
    para = Paraphraser(res['t'][-2].shape).eval()
    trans = Translator(res['s'][-2].shape, res['t'][-2].shape).eval()
    with torch.no_grad():
        factor_s = trans(res['s'][-2])
        factor_t = para(res['t'][-2], is_factor=True)
        close(FactorTransfer()(factor_s, factor_t), ft_ref(factor_s, factor_t))
        # the pooling rule, both ways, and the p2 != 1 branch
        a, b = torch.randn(BATCH, 6, 8, 8), torch.randn(BATCH, 10, 4, 4)
        close(FactorTransfer()(a, b), ft_ref(a, b))
        close(FactorTransfer(p1=2, p2=2)(b, a), ft_ref(b, a, p2=2))


def test_ft_gradients_reach_student_and_translator_only(res):
    torch.manual_seed(0)
    para = Paraphraser(res['t'][-2].shape).eval().requires_grad_(False)
    trans = Translator(res['s'][-2].shape, res['t'][-2].shape)
    f_s = leaves([res['s'][-2]])[0]
    with torch.no_grad():  # the teacher side, as RepDistiller's loop computes it
        factor_t = para(res['t'][-2], is_factor=True)
    FactorTransfer()(trans(f_s), factor_t).backward()
    assert f_s.grad.abs().sum() > 0
    assert all(p.grad is not None for p in trans.parameters())
    assert all(p.grad is None for p in para.parameters())


def test_ft_init_learning_rate_rule():
    assert init_learning_rate('resnet8x4', 0.05) == 0.01
    assert init_learning_rate('wrn_16_2', 0.05) == 0.01
    assert init_learning_rate('vgg8', 0.05) == 0.05
    assert init_learning_rate('ShuffleV1', 0.01) == 0.01


# ---------------------------------------------------------------- FSP

def fsp_np(g):
    """FSP matrices as sums of per-position outer products, float64."""
    mats = []
    for bot, top in zip(g[:-1], g[1:]):
        bot, top = match_np(np64(bot), np64(top))
        B, P = bot.shape[0], bot.shape[2] * bot.shape[3]
        bot, top = bot.reshape(B, bot.shape[1], P), top.reshape(B, top.shape[1], P)
        G = np.zeros((B, top.shape[1], bot.shape[1]))
        for b in range(B):
            for p in range(P):
                G[b] += np.outer(top[b, :, p], bot[b, :, p])
        mats.append(G / P)
    return mats


def test_fsp_matches_outer_products(res):
    g_s, g_t = res['s'][:-1], res['t'][:-1]
    losses = FSP([f.shape for f in g_s], [f.shape for f in g_t])(g_s, g_t)
    expected = [((s - t) ** 2).mean() for s, t in zip(fsp_np(g_s), fsp_np(g_t))]
    assert len(losses) == 3
    for value, ref in zip(losses, expected):
        close(value, ref)


def test_fsp_refuses_unequal_channels_in_one_line(wrn):
    s_shapes = [f.shape for f in wrn['s1'][:-1]]  # wrn_40_1: 16, 16, 32, 64 channels
    t_shapes = [f.shape for f in wrn['t'][:-1]]   # wrn_40_2: 16, 32, 64, 128
    with pytest.raises(UserError, match='map 1 has 16 channels in the student and 32 in the teacher') as err:
        FSP(s_shapes, t_shapes)
    assert '\n' not in str(err.value) and 'wrn_40_2 -> wrn_40_1' in str(err.value)
    with pytest.raises(UserError, match='student has 3 and the teacher 4'):
        check_fsp_pair(s_shapes[:3], t_shapes)
    # same channels, other spatial sizes: the matrices still compare (the reference accepts it)
    check_fsp_pair([(2, 8, 16, 16), (2, 4, 8, 8)], [(2, 8, 32, 32), (2, 4, 16, 16)])
    check_fsp_pair([f.shape for f in wrn['s'][:-1]], t_shapes)  # wrn_16_2: the widths of wrn_40_2


def test_fsp_gradients_reach_student(res):
    g_s = leaves(res['s'][:-1])
    g_t = [f.detach() for f in res['t'][:-1]]  # RepDistiller's loop detaches the teacher
    sum(FSP([f.shape for f in g_s], [f.shape for f in g_t])(g_s, g_t)).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in g_s)


# ---------------------------------------------------------------- NST

def nst_ref(f_s, f_t):
    """Squared MMD through spatial Gram matrices: sum_ij (x_i . y_j)^2 = <X^T X, Y^T Y>."""
    s, t = match_np(np64(f_s), np64(f_t))
    B = s.shape[0]
    s, t = s.reshape(B, s.shape[1], -1), t.reshape(B, t.shape[1], -1)
    # F.normalize's eps: an all-zero channel (a dead ReLU) stays zero
    s = s / np.maximum(np.linalg.norm(s, axis=2, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=2, keepdims=True), 1e-12)
    total = 0.0
    for b in range(B):
        gs, gt = s[b].T @ s[b], t[b].T @ t[b]
        cs, ct = s.shape[1], t.shape[1]
        total += (gt * gt).sum() / ct ** 2 + (gs * gs).sum() / cs ** 2 - 2 * (gs * gt).sum() / (cs * ct)
    return total / B


def test_nst_matches_gram_decomposition(res, wrn):
    for g_s, g_t in ((res['s'][1:-1], res['t'][1:-1]), (wrn['s1'][1:-1], wrn['t'][1:-1])):
        losses = NSTLoss()(g_s, g_t)
        assert len(losses) == 3
        for value, f_s, f_t in zip(losses, g_s, g_t):
            close(value, nst_ref(f_s, f_t), rtol=1e-4, atol=1e-6)
    a, b = torch.rand(BATCH, 6, 8, 8), torch.rand(BATCH, 10, 4, 4)  # pooling both ways
    close(NSTLoss().nst_loss(a, b), nst_ref(a, b), atol=1e-6)
    close(NSTLoss().nst_loss(b, a), nst_ref(b, a), atol=1e-6)


def test_nst_teacher_self_term_is_detached(res):
    f_s, f_t = leaves([res['s'][2], res['t'][2]])
    NSTLoss()([f_s], [f_t])[0].backward()
    assert f_s.grad.abs().sum() > 0
    # the teacher's gradient is the cross term's alone: -2 mean K(s, t), in float64
    s64, t64 = f_s.detach().double(), f_t.detach().double().requires_grad_(True)
    s64 = F.normalize(s64.flatten(2), dim=2)
    tn = F.normalize(t64.flatten(2), dim=2)
    cross = torch.einsum('bcp,bdp->bcd', s64, tn).pow(2).mean()
    (-2 * cross).backward()
    assert torch.allclose(f_t.grad.double(), t64.grad, rtol=1e-3, atol=1e-9)


# ---------------------------------------------------------------- KDSVD

def right_vectors(f, n):
    """First ``n`` right singular vectors and normalised singular values of each sample's
    ``(H*W, C)`` matrix, from ``eigh`` of its float64 ``C x C`` Gram matrix; each vector's
    sign is the one float32 ``torch.svd`` on the CPU gives (the reference's definition)."""
    B, C = f.shape[:2]
    x = np64(f).reshape(B, C, -1).transpose(0, 2, 1)
    v_svd = torch.svd(f.detach().float().reshape(B, C, -1).transpose(1, 2))[2].double().numpy()
    vs, ss = [], []
    for b in range(B):
        w, V = np.linalg.eigh(x[b].T @ x[b])
        order = np.argsort(w)[::-1][:n]
        V, sing = V[:, order], np.sqrt(np.maximum(w[order], 0))
        V = V * np.sign((V * v_svd[b, :, :n]).sum(axis=0))
        vs.append(V)
        ss.append(sing / np.linalg.norm(sing))
    return np.stack(vs), np.stack(ss)


def kdsvd_ref(g_s, g_t, k=1, flip_teacher_layer=None):
    losses, prev = [], None
    B = g_s[0].shape[0]
    for i, (f_s, f_t) in enumerate(zip(g_s, g_t)):
        vt, st = right_vectors(f_t, k)
        vs, _ = right_vectors(f_s, k + 3)
        if i == flip_teacher_layer:
            vt = -vt
        aligned = np.zeros_like(vt)
        for b in range(B):
            for j in range(k):
                cos = vs[b].T @ vt[b, :, j]
                best = np.argmax(np.abs(cos))
                aligned[b, :, j] = np.sign(cos[best]) * vs[b, :, best]
        v_t, v_s = vt * st[:, None, :], aligned * st[:, None, :]
        if prev is not None:
            p_s, p_t = prev
            total = 0.0
            for b in range(B):
                s_rbf = np.exp(-(v_s[b][:, None, :] - p_s[b][None, :, :]) ** 2 / 8)
                t_rbf = np.exp(-(v_t[b][:, None, :] - p_t[b][None, :, :]) ** 2 / 8)
                total += ((s_rbf - t_rbf) ** 2).sum()
            losses.append(total / B)
        prev = (v_s, v_t)
    return losses


@pytest.mark.parametrize('pair', ['res', 'wrn'])
def test_kdsvd_matches_eigh_on_cpu_float32(res, wrn, pair):
    if pair == 'res':
        g_s, g_t = res['s'][1:-1], res['t'][1:-1]
    else:
        g_s, g_t = wrn['s'][1:-1], wrn['t'][1:-1]  # wrn_40_2 -> wrn_16_2
    assert all(f.dtype == torch.float32 and f.device.type == 'cpu' for f in g_s + g_t)
    losses = KDSVD()(g_s, g_t)
    expected = kdsvd_ref(g_s, g_t)
    assert len(losses) == 2
    for value, ref in zip(losses, expected):
        assert value.dtype == torch.float32
        close(value, ref, rtol=1e-4)
    # the value depends on the teacher vectors' signs, so the comparison above pins them
    flipped = kdsvd_ref(g_s, g_t, flip_teacher_layer=1)
    assert abs(flipped[0] - expected[0]) > 1e-3 * abs(expected[0])


def test_kdsvd_gradients_reach_student_not_teacher(res):
    g_s = leaves(res['s'][1:-1])
    g_t = leaves(res['t'][1:-1])  # asks for a gradient: the teacher RBF is detached in the loss
    sum(KDSVD()(g_s, g_t)).backward()
    assert all(torch.isfinite(f.grad).all() for f in g_s)
    assert g_s[2].grad.abs().sum() > 0
    for f in g_t:
        assert f.grad is None or f.grad.abs().max() < 1e-6


def test_kdsvd_zeroes_only_the_gradient_of_degenerate_samples(monkeypatch):
    """torch.svd's backward gives NaN for a matrix with repeated singular values (here
    eight all-zero channels); that sample's gradient is zeroed, the others' are untouched."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32)
    with torch.no_grad():  # default initialisation: no dead channel
        g_t = model_dict['resnet8x4'](num_classes=100).eval()(x, is_feat=True)[0][1:-1]
        g_s = model_dict['resnet8x4'](num_classes=100).eval()(x, is_feat=True)[0][1:-1]

    def grads(feats):
        feats = leaves(feats)
        sum(KDSVD()(feats, g_t)).backward()
        return [f.grad for f in feats]

    healthy = grads(g_s)
    assert all(torch.isfinite(g).all() and (g.flatten(1).abs().sum(1) > 0).all() for g in healthy)
    g_s[0][0, :8] = 0  # sample 0, first stage map
    guarded = grads(g_s)
    assert torch.equal(guarded[0][0], torch.zeros_like(guarded[0][0]))
    assert torch.equal(guarded[0][1:], healthy[0][1:]) and torch.equal(guarded[2], healthy[2])
    # without the guard (RepDistiller): that sample's gradient is not finite
    monkeypatch.setattr(sys.modules['distiller_zoo.KDSVD'], 'zero_nonfinite_samples', lambda grad: grad)
    unguarded = grads(g_s)
    assert torch.isfinite(unguarded[0].flatten(1)).all(1).tolist() == [False, True, True, True]


def test_check_kdsvd_pair(wrn):
    check_kdsvd_pair([f.shape for f in wrn['s'][1:-1]], [f.shape for f in wrn['t'][1:-1]])
    with pytest.raises(UserError, match='map 1 has 16 channels in the student and 32 in the teacher'):
        check_kdsvd_pair([f.shape for f in wrn['s1'][1:-1]], [f.shape for f in wrn['t'][1:-1]])


# ---------------------------------------------------------------- OFD

def trapezoid(y, x):
    return ((y[1:] + y[:-1]) / 2 * np.diff(x)).sum()


def margins_quadrature(weight, bias):
    """E[x | x < 0] for x ~ N(bias, weight^2) by the trapezoid rule; -3|w| where P(x < 0) <= 0.001."""
    out = []
    for w, m in zip(weight, bias):
        s = abs(w)
        x = np.linspace(m - 12 * s, 0.0, 400001)
        p = np.exp(-((x - m) / s) ** 2 / 2) / (s * np.sqrt(2 * np.pi))
        mass = trapezoid(p, x)
        out.append(trapezoid(x * p, x) / mass if mass > 0.001 else -3 * s)
    return np.array(out)


def test_get_margin_from_bn_matches_quadrature():
    bn = nn.BatchNorm2d(7)
    weight = [1.0, 0.5, -2.0, 0.3, 1.0, 0.05, 1.0]
    bias = [0.0, -1.0, 1.5, 1.0, 3.2, 0.0, 2.0]  # ch 4: P(x<0) ~ 7e-4 -> -3s; ch 6: 0.023
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(weight))
        bn.bias.copy_(torch.tensor(bias))
    margin = get_margin_from_BN(bn)
    assert margin.shape == (7,) and margin.dtype == torch.float32 and margin.device == bn.weight.device
    np.testing.assert_allclose(margin.numpy(), margins_quadrature(weight, bias), rtol=1e-5, atol=1e-6)
    assert margin[4].item() == pytest.approx(-3.0)
    assert (margin < 0).all()


def test_get_margin_from_bn_zero_weight_is_the_limit():
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.copy_(torch.tensor([-0.7, 0.4]))
    assert get_margin_from_BN(bn).tolist() == pytest.approx([-0.7, 0.0])


def feat_loss_authors(s, t, margin):
    """clovaai's form: target raised to the margin, kept where s > target or target > 0;
    summed, then divided by the batch (train_with_distillation.py)."""
    s, t, m = np64(s), np64(t), np64(margin)
    t = np.maximum(t, m)
    mask = (s > t) | (t > 0)
    return (((s - t) ** 2) * mask).sum() / s.shape[0]


def test_feat_loss_matches_authors_form(res):
    f_s, f_t = res['s_pre'][1:-1], res['t_pre'][1:-1]
    bns = res['t_model'].get_bn_before_relu()
    torch.manual_seed(0)
    connector = ConnectorConvBN([f.shape[1] for f in f_s], [f.shape[1] for f in f_t]).eval()
    with torch.no_grad():
        for src, tgt, bn in zip(connector(f_s), f_t, bns):
            margin = get_margin_from_BN(bn).reshape(1, -1, 1, 1)
            value = feat_loss(src, tgt, margin)
            close(value, feat_loss_authors(src, tgt, margin), rtol=1e-5)
            assert value > 0
        # the teacher pooled to a smaller student map, as mdistiller wires it
        src = torch.randn(BATCH, 256, 4, 4)
        tgt = F.adaptive_avg_pool2d(f_t[-1], (4, 4))
        margin = get_margin_from_BN(bns[-1]).reshape(1, -1, 1, 1)
        close(feat_loss(src, tgt, margin), feat_loss_authors(src, tgt, margin), rtol=1e-5)


def test_ofd_connector_layout_and_init():
    torch.manual_seed(0)
    conn = ConnectorConvBN([64, 128], [256, 512])
    keys = [k for k in conn.state_dict() if not k.endswith('num_batches_tracked')]
    assert keys == ['connectors.{}.{}'.format(i, k) for i in range(2)
                    for k in ('0.weight', '1.weight', '1.bias', '1.running_mean', '1.running_var')]
    conv, bn = conn.connectors[1]
    assert conv.weight.shape == (512, 128, 1, 1) and conv.bias is None and conv.padding == (0, 0)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.03)
    assert torch.equal(bn.weight, torch.ones(512)) and torch.equal(bn.bias, torch.zeros(512))
    conv3 = build_feature_connector(32, 16, kernel_size=3)[0]
    assert conv3.padding == (1, 1)
    assert conv3.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 32)), rel=0.1)
    with pytest.raises(ValueError):
        ConnectorConvBN([1, 2], [3])


def test_ofd_gradients_reach_student_and_connector_not_teacher(res):
    f_s = leaves(res['s_pre'][1:-1])
    f_t = [f.detach() for f in res['t_pre'][1:-1]]  # mdistiller: no-grad teacher, pooled and detached
    connector = ConnectorConvBN([f.shape[1] for f in f_s], [f.shape[1] for f in f_t])
    margins = [get_margin_from_BN(bn).reshape(1, -1, 1, 1) for bn in res['t_model'].get_bn_before_relu()]
    sum(feat_loss(src, tgt, m) for src, tgt, m in zip(connector(f_s), f_t, margins)).backward()
    assert all(f.grad.abs().sum() > 0 for f in f_s)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())
    assert all(p.grad is None for p in res['t_model'].parameters())


# ---------------------------------------------------------------- get_bn_before_relu

def run_with_hooks(model, x, modules):
    """Pre- and post-activation features of ``model(x)`` and, per key of ``modules``, the
    (input, output) of that module's last call."""
    seen = {}

    def keep(key):
        # clones: an in-place ReLU after the module (WRN's relu1) would change what is kept;
        # residual blocks return (out, preact), of which only their input is used
        def hook(module, inp, out):
            seen[key] = (inp[0].clone(), out.clone() if torch.is_tensor(out) else None)
        return hook

    handles = [m.register_forward_hook(keep(key)) for key, m in modules.items()]
    with torch.no_grad():
        feats, _ = model(x, is_feat=True, preact=True)
        plain, _ = model(x, is_feat=True, preact=False)
    for h in handles:
        h.remove()
    return feats, plain, seen


@pytest.mark.parametrize('name, block_bn, shortcut', [
    ('resnet8x4', 'bn2', 'downsample'),
    ('ResNet50_cifar', 'bn3', 'shortcut'),
])
def test_bn_before_relu_residual_families(name, block_bn, shortcut):
    """ResNets: the BN is the residual branch's last layer, pre-activation = BN out + shortcut."""
    torch.manual_seed(0)
    model = model_dict[name](num_classes=100).eval()
    stages = [model.layer1, model.layer2, model.layer3] + ([model.layer4] if hasattr(model, 'layer4') else [])
    blocks = [stage[-1] for stage in stages]
    bns = model.get_bn_before_relu()
    assert len(bns) == len(stages) and all(bn is getattr(b, block_bn) for bn, b in zip(bns, blocks))
    modules = {('bn', i): bn for i, bn in enumerate(bns)}
    modules.update({('block', i): b for i, b in enumerate(blocks)})
    modules.update({('short', i): getattr(b, shortcut) for i, b in enumerate(blocks)
                    if getattr(b, shortcut) is not None})
    feats, plain, seen = run_with_hooks(model, torch.randn(1, 3, 32, 32), modules)
    for i in range(len(bns)):
        # no shortcut module: the identity, the block's input
        short = seen[('short', i)][1] if ('short', i) in seen else seen[('block', i)][0]
        assert torch.equal(feats[1 + i], seen[('bn', i)][1] + short)
        assert torch.equal(plain[1 + i], F.relu(feats[1 + i]))


def test_bn_before_relu_vgg_and_wrn_are_the_preact_features():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for name, n in (('vgg8', 4), ('wrn_16_1', 3)):
        model = model_dict[name](num_classes=100).eval()
        bns = model.get_bn_before_relu()
        assert len(bns) == n and all(isinstance(bn, nn.BatchNorm2d) for bn in bns)
        feats, plain, seen = run_with_hooks(model, x, dict(enumerate(bns)))
        for i in range(n):
            bn_in, bn_out = seen[i]
            assert torch.equal(feats[1 + i], bn_out)
            if name == 'vgg8':  # the feature is the BN output's ReLU
                assert torch.equal(plain[1 + i], F.relu(bn_out))
            else:  # WRN: the BN reads the raw stage output (the next block's, or the final BN)
                assert torch.equal(plain[1 + i], bn_in)


def test_bn_before_relu_mobilenetv2_ends_its_feature_blocks():
    """MobileNetV2 (the reference ignores preact): each BN is the last layer of a feature
    block, whose output is the BN output, plus the block input where the block is residual."""
    torch.manual_seed(0)
    model = model_dict['MobileNetV2'](num_classes=100).eval()
    bns = model.get_bn_before_relu()
    blocks = [model.blocks[i][-1] for i in (1, 2, 4, 6)]
    assert len(bns) == 4 and all(bn is b.conv[-1] for bn, b in zip(bns, blocks))
    assert [b.use_res_connect for b in blocks] == [True, True, True, False]
    modules = {('bn', i): bn for i, bn in enumerate(bns)}
    modules.update({('block', i): b for i, b in enumerate(blocks)})
    feats, _, seen = run_with_hooks(model, torch.randn(2, 3, 32, 32), modules)
    for i, block in enumerate(blocks):
        expected = seen[('bn', i)][1] + (seen[('block', i)][0] if block.use_res_connect else 0)
        assert torch.equal(feats[1 + i], expected)


@pytest.mark.parametrize('name', ['ShuffleV1', 'ShuffleV2'])
def test_bn_before_relu_shufflenets_refuse(name):
    model = model_dict[name](num_classes=100)
    with pytest.raises(UserError, match='{} cannot be the teacher of --distill ofd'.format(name)):
        model.get_bn_before_relu()
