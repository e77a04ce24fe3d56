"""KD, FitNet, AT, SP, CC, VID, RKD and PKT: values, gradients, and a few training steps.

Each loss is checked against an independent float64 computation of its formula (loops
and plain arithmetic, not the implementation's primitives); each adapter against the
features it must use; gradients against the tensors and parameters they must reach; and
a few SGD steps with a real student and teacher must lower the distillation term.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distiller_zoo import (DISTILLERS, PKT, Attention, Correlation, DistillKL, HintLoss, RKDLoss,
                           Similarity, VIDLoss, build_distiller, reference_weights)
from helper.errors import UserError
from models import model_dict
from models.util import ConvReg

MY_METHODS = ['kd', 'hint', 'attention', 'similarity', 'correlation', 'vid', 'rkd', 'pkt']


def make_opt(**kw):
    opt = dict(kd_T=4.0, hint_layer=1, feat_dim=16, batch_size=4)
    opt.update(kw)
    return SimpleNamespace(**opt)


def close(value, expected, rtol=1e-4, atol=1e-7):
    assert value.dim() == 0, 'loss must be a 0-dim tensor, got shape {}'.format(tuple(value.shape))
    assert math.isclose(value.item(), float(expected), rel_tol=rtol, abs_tol=atol), (value.item(), expected)


# ---------------------------------------------------------------- float64 reference pieces

def pool_ref(x, size):
    """Adaptive average pooling of (B, C, H, W) to size x size, window by window."""
    H, W = x.shape[2], x.shape[3]
    out = torch.empty(x.shape[0], x.shape[1], size, size, dtype=torch.float64)
    for i in range(size):
        h0, h1 = (i * H) // size, -((-(i + 1) * H) // size)
        for j in range(size):
            w0, w1 = (j * W) // size, -((-(j + 1) * W) // size)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].double().mean(dim=(2, 3))
    return out


def match_ref(f_s, f_t):
    """Pool the taller map down to the shorter one's size (the methods' shared rule)."""
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        return pool_ref(f_s, t_H), f_t.double()
    if s_H < t_H:
        return f_s.double(), pool_ref(f_t, s_H)
    return f_s.double(), f_t.double()


def huber_ref(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def kd_ref(y_s, y_t, T):
    total = 0.0
    for row_s, row_t in zip(y_s.double().tolist(), y_t.double().tolist()):
        def softmax(row):
            top = max(v / T for v in row)
            e = [math.exp(v / T - top) for v in row]
            return [v / sum(e) for v in e]
        p_s, p_t = softmax(row_s), softmax(row_t)
        total += sum(t * math.log(t / s) for s, t in zip(p_s, p_t))
    return total / len(y_s) * T * T


def at_ref(f_s, f_t, p=2):
    f_s, f_t = match_ref(f_s, f_t)
    total, count = 0.0, 0
    for a, b in zip(f_s, f_t):
        q_s = (a ** p).sum(0).flatten() / a.shape[0]
        q_t = (b ** p).sum(0).flatten() / b.shape[0]
        q_s = q_s / math.sqrt(float((q_s * q_s).sum()))
        q_t = q_t / math.sqrt(float((q_t * q_t).sum()))
        total += float(((q_s - q_t) ** 2).sum())
        count += q_s.numel()
    return total / count


def sp_ref(f_s, f_t):
    B = f_s.shape[0]
    s, t = f_s.double().reshape(B, -1), f_t.double().reshape(B, -1)

    def gram(f):
        G = [[float(torch.dot(f[i], f[j])) for j in range(B)] for i in range(B)]
        return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in G]
    G_s, G_t = gram(s), gram(t)
    return sum((G_t[i][j] - G_s[i][j]) ** 2 for i in range(B) for j in range(B)) / (B * B)


def cc_ref(e_s, e_t):
    e_s, e_t = e_s.double().tolist(), e_t.double().tolist()
    pairs = [sum(abs(e_s[i][d] - e_t[i][d]) * abs(e_s[i + 1][d] - e_t[i + 1][d]) for d in range(len(e_s[0])))
             for i in range(len(e_s) - 1)]
    return sum(pairs) / len(pairs)


def vid_ref(vid, f_s, f_t):
    """Gaussian NLL with softplus variance; the mean net applied pixel by pixel."""
    f_s, f_t = match_ref(f_s, f_t)
    W = [conv.weight.detach().double()[:, :, 0, 0] for conv in vid.regressor if isinstance(conv, torch.nn.Conv2d)]
    var = [math.log(1 + math.exp(a)) + vid.eps for a in vid.log_scale.detach().double().tolist()]
    total, count = 0.0, 0
    B, _, H, Wd = f_s.shape
    for b in range(B):
        for i in range(H):
            for j in range(Wd):
                mu = W[2] @ torch.relu(W[1] @ torch.relu(W[0] @ f_s[b, :, i, j]))
                for c, v in enumerate(var):
                    diff = float(mu[c] - f_t[b, c, i, j])
                    total += 0.5 * (diff * diff / v + math.log(v))
                    count += 1
    return total / count


def rkd_ref(f_s, f_t, w_d=25, w_a=50):
    B = f_s.shape[0]
    s, t = f_s.double().reshape(B, -1), f_t.double().reshape(B, -1)

    def distances(e):
        d = [[math.sqrt(float(((e[i] - e[j]) ** 2).sum())) for j in range(B)] for i in range(B)]
        mean = sum(d[i][j] for i in range(B) for j in range(B) if i != j) / (B * (B - 1))
        return [[v / mean for v in row] for row in d]

    def cosine(e, a, b, c):
        u, v = e[b] - e[a], e[c] - e[a]
        nu, nv = float(u.norm()), float(v.norm())
        return 0.0 if nu == 0 or nv == 0 else float(torch.dot(u, v)) / (nu * nv)
    d_s, d_t = distances(s), distances(t)
    loss_d = sum(huber_ref(d_s[i][j] - d_t[i][j]) for i in range(B) for j in range(B)) / B ** 2
    loss_a = sum(huber_ref(cosine(s, a, b, c) - cosine(t, a, b, c))
                 for a in range(B) for b in range(B) for c in range(B)) / B ** 3
    return w_d * loss_d + w_a * loss_a


def pkt_ref(f_s, f_t, eps=1e-7):
    B = f_s.shape[0]

    def probabilities(f):
        f = f.double()
        norms = [math.sqrt(float((f[i] * f[i]).sum())) + eps for i in range(B)]
        k = [[(float(torch.dot(f[i], f[j])) / (norms[i] * norms[j]) + 1) / 2 for j in range(B)] for i in range(B)]
        return [[v / sum(row) for v in row] for row in k]
    p_s, p_t = probabilities(f_s), probabilities(f_t)
    return sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps))
               for i in range(B) for j in range(B)) / (B * B)


def conv_ref(x, weight, bias, stride, padding):
    """Convolution as patches times weights."""
    B, _, H, W = x.shape
    k_h, k_w = weight.shape[2], weight.shape[3]
    out_h, out_w = (H + 2 * padding - k_h) // stride + 1, (W + 2 * padding - k_w) // stride + 1
    cols = F.unfold(x.double(), (k_h, k_w), padding=padding, stride=stride)
    out = weight.double().reshape(weight.shape[0], -1) @ cols + bias.double().reshape(1, -1, 1)
    return out.reshape(B, -1, out_h, out_w)


def conv_transpose_ref(x, weight, bias, stride, padding):
    """Transposed convolution: every input pixel scatters its weighted kernel into the output."""
    B, _, H, W = x.shape
    k = weight.shape[2]
    out_h, out_w = (H - 1) * stride - 2 * padding + k, (W - 1) * stride - 2 * padding + k
    full = torch.zeros(B, weight.shape[1], out_h + 2 * padding + k, out_w + 2 * padding + k, dtype=torch.float64)
    w = weight.double()
    for i in range(H):
        for j in range(W):
            patch = torch.einsum('bc,cokl->bokl', x[:, :, i, j].double(), w)
            full[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += patch
    out = full[:, :, padding:padding + out_h, padding:padding + out_w]
    return out + bias.double().reshape(1, -1, 1, 1)


def hint_ref(reg, f_s, f_t):
    """ConvReg (train-mode BN + ReLU) followed by the mean squared error."""
    conv = reg.conv
    if isinstance(conv, torch.nn.ConvTranspose2d):
        y = conv_transpose_ref(f_s, conv.weight.detach(), conv.bias.detach(), conv.stride[0], conv.padding[0])
    else:
        y = conv_ref(f_s, conv.weight.detach(), conv.bias.detach(), conv.stride[0], conv.padding[0])
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    y = (y - mean) / torch.sqrt(var + reg.bn.eps)
    y = y * reg.bn.weight.detach().double().reshape(1, -1, 1, 1) + reg.bn.bias.detach().double().reshape(1, -1, 1, 1)
    y = y.clamp(min=0)
    target = f_t.double() if y.shape[2] == f_t.shape[2] else pool_ref(f_t, y.shape[2])
    return float(((y - target) ** 2).mean())


# ---------------------------------------------------------------- hand-made feature lists

def feature_lists(batch=4, seed=0):
    """Feature lists shaped like resnet8's (student) and resnet8x4's (teacher), spatially halved."""
    g = torch.Generator().manual_seed(seed)
    s_shapes = [(16, 16, 16), (16, 16, 16), (32, 8, 8), (64, 4, 4), (64,)]
    t_shapes = [(32, 16, 16), (64, 16, 16), (128, 8, 8), (256, 4, 4), (256,)]
    feat_s = [torch.rand((batch,) + s, generator=g) for s in s_shapes]
    feat_t = [torch.rand((batch,) + s, generator=g) for s in t_shapes]
    return feat_s, feat_t


def logits(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 10, generator=g) * 3, torch.randn(batch, 10, generator=g) * 3


BATCH = {'target': torch.zeros(4, dtype=torch.long)}


# ---------------------------------------------------------------- 1) values

def test_all_eight_methods_registered():
    for name in MY_METHODS:
        assert name in DISTILLERS
        feat_s, feat_t = feature_lists()
        assert isinstance(build_distiller(name, feat_s, feat_t, make_opt()), DISTILLERS[name])


@pytest.mark.parametrize('T', [1.0, 4.0])
def test_distill_kl_value(T):
    y_s, y_t = logits()
    close(DistillKL(T)(y_s, y_t), kd_ref(y_s, y_t, T))
    close(DistillKL(T)(y_t, y_t), 0.0, atol=1e-6)


def test_kd_adapter_is_a_zero_on_the_logits_device():
    feat_s, feat_t = feature_lists()
    y_s, y_t = logits()
    kd = build_distiller('kd', feat_s, feat_t, make_opt())
    out = kd(feat_s, feat_t, y_s.double(), y_t, BATCH)
    assert out.dim() == 0 and out.item() == 0.0
    assert out.device == y_s.device and out.dtype == torch.float64
    assert list(kd.parameters()) == []


@pytest.mark.parametrize('s_hw,t_hw,layer', [
    (8, 4, torch.nn.Conv2d),            # student twice as tall: stride-2 conv
    (4, 8, torch.nn.ConvTranspose2d),   # student half as tall: transposed conv
    (6, 4, torch.nn.Conv2d),            # taller by 2: "valid" 3x3 conv
    (3, 8, torch.nn.Conv2d),            # shorter, not half: same-size conv, teacher pooled
])
def test_convreg_and_hint_loss_value(s_hw, t_hw, layer):
    torch.manual_seed(0)
    f_s, f_t = torch.randn(3, 5, s_hw, s_hw), torch.randn(3, 7, t_hw, t_hw)
    reg = ConvReg(f_s.shape, f_t.shape)
    assert type(reg.conv) is layer
    r_s, r_t = reg(f_s, f_t)
    size = t_hw if (s_hw >= t_hw or 2 * s_hw == t_hw) else s_hw  # only the last rule pools the teacher
    assert r_s.shape == r_t.shape == (3, 7, size, size)
    close(HintLoss()(r_s, r_t), hint_ref(reg, f_s, f_t))


@pytest.mark.parametrize('hint_layer', [0, 1, 2, 3])
def test_hint_adapter_value(hint_layer):
    feat_s, feat_t = feature_lists()
    fitnet = build_distiller('hint', feat_s, feat_t, make_opt(hint_layer=hint_layer))
    out = fitnet(feat_s, feat_t, *logits(), BATCH)
    close(out, hint_ref(fitnet.regressor, feat_s[hint_layer], feat_t[hint_layer]))


@pytest.mark.parametrize('bad', [4, 5, -1])
def test_hint_layer_out_of_range_is_a_user_error(bad):
    feat_s, feat_t = feature_lists()
    with pytest.raises(UserError, match='hint_layer {}.*0, 1, 2, 3'.format(bad)):
        build_distiller('hint', feat_s, feat_t, make_opt(hint_layer=bad))


def test_attention_value():
    torch.manual_seed(0)
    g_s = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4), torch.randn(3, 6, 6, 6)]
    g_t = [torch.randn(3, 5, 4, 4), torch.randn(3, 8, 8, 8)]  # pooled either way; zip drops g_s[2]
    losses = Attention()(g_s, g_t)
    assert len(losses) == 2
    for loss, f_s, f_t in zip(losses, g_s, g_t):
        close(loss, at_ref(f_s, f_t))
    close(Attention(p=4)([g_s[0]], [g_t[0]])[0], at_ref(g_s[0], g_t[0], p=4))
    # scale-free: a rescaled copy of the same map has the same attention
    close(Attention()([g_s[0] * 3], [g_s[0]])[0], 0.0, atol=1e-9)


def test_attention_adapter_value():
    feat_s, feat_t = feature_lists()
    out = build_distiller('attention', feat_s, feat_t, make_opt())(feat_s, feat_t, *logits(), BATCH)
    close(out, sum(at_ref(a, b) for a, b in zip(feat_s[1:-1], feat_t[1:-1])))


def test_similarity_value():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(5, 3, 2, 2), torch.randn(5, 7)
    losses = Similarity()([f_s], [f_t])
    assert len(losses) == 1
    close(losses[0], sp_ref(f_s, f_t))
    feat_s, feat_t = feature_lists()
    out = build_distiller('similarity', feat_s, feat_t, make_opt())(feat_s, feat_t, *logits(), BATCH)
    close(out, sp_ref(feat_s[-2], feat_t[-2]))


def test_correlation_value():
    torch.manual_seed(0)
    e_s, e_t = torch.randn(6, 5), torch.randn(6, 5)
    close(Correlation()(e_s, e_t), cc_ref(e_s, e_t))
    feat_s, feat_t = feature_lists()
    cc = build_distiller('correlation', feat_s, feat_t, make_opt(feat_dim=8))
    assert cc.embed_s.linear.weight.shape == (8, 64) and cc.embed_t.linear.weight.shape == (8, 256)
    with torch.no_grad():
        e_s = feat_s[-1].double() @ cc.embed_s.linear.weight.double().t() + cc.embed_s.linear.bias.double()
        e_t = feat_t[-1].double() @ cc.embed_t.linear.weight.double().t() + cc.embed_t.linear.bias.double()
    close(cc(feat_s, feat_t, *logits(), BATCH), cc_ref(e_s, e_t))


@pytest.mark.parametrize('name', ['correlation', 'rkd'])
def test_single_sample_batch_is_zero_not_nan(name):
    distiller = build_distiller(name, *feature_lists(), make_opt())
    feat_s, feat_t = feature_lists(batch=1)
    assert distiller(feat_s, feat_t, *logits(batch=1), BATCH).item() == 0.0


def test_bad_method_inputs_are_user_errors():
    with pytest.raises(UserError, match='--feat_dim'):
        build_distiller('correlation', *feature_lists(), make_opt(feat_dim=0))
    feat_s, feat_t = feature_lists()
    for name in ['attention', 'vid']:
        with pytest.raises(UserError, match='stage feature map'):
            build_distiller(name, [feat_s[0], feat_s[-1]], [feat_t[0], feat_t[-1]], make_opt())


@pytest.mark.parametrize('s_hw,t_hw', [(4, 4), (4, 2), (2, 4)])
def test_vid_value(s_hw, t_hw):
    torch.manual_seed(0)
    vid = VIDLoss(3, 5, 4)
    # the variance starts at init_pred_var
    assert torch.allclose(F.softplus(vid.log_scale.double()) + vid.eps, torch.full((4,), 5.0, dtype=torch.float64))
    with torch.no_grad():
        vid.log_scale.add_(torch.randn(4))
    f_s, f_t = torch.randn(2, 3, s_hw, s_hw), torch.randn(2, 4, t_hw, t_hw)
    close(vid(f_s, f_t), vid_ref(vid, f_s, f_t))


def test_vid_adapter_value():
    feat_s, feat_t = feature_lists(batch=2)
    vid = build_distiller('vid', feat_s, feat_t, make_opt())
    assert len(vid.vid) == 3
    assert [m.regressor[0].in_channels for m in vid.vid] == [16, 32, 64]
    assert [m.regressor[4].out_channels for m in vid.vid] == [64, 128, 256]
    out = vid(feat_s, feat_t, *logits(batch=2), BATCH)
    close(out, sum(vid_ref(m, a, b) for m, a, b in zip(vid.vid, feat_s[1:-1], feat_t[1:-1])))


def test_rkd_value():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(5, 6), torch.randn(5, 9)
    close(RKDLoss()(f_s, f_t), rkd_ref(f_s, f_t))
    close(RKDLoss(w_d=1, w_a=0)(f_s, f_t), rkd_ref(f_s, f_t, 1, 0))
    close(RKDLoss(w_d=0, w_a=1)(f_s, f_t), rkd_ref(f_s, f_t, 0, 1))
    # distances are normalised by their mean, so a rescaled copy costs nothing
    close(RKDLoss()(f_s * 3, f_s), 0.0, atol=1e-5)
    feat_s, feat_t = feature_lists()
    out = build_distiller('rkd', feat_s, feat_t, make_opt())(feat_s, feat_t, *logits(), BATCH)
    close(out, rkd_ref(feat_s[-1], feat_t[-1]))


def test_pkt_value():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(5, 6), torch.randn(5, 9)
    close(PKT()(f_s, f_t), pkt_ref(f_s, f_t), atol=1e-8)
    close(PKT()(f_s * 3, f_s), 0.0, atol=1e-7)
    feat_s, feat_t = feature_lists()
    feat_s[-1] = feat_s[-1] - 0.5  # centred, so the cosines spread and the loss is not tiny
    feat_t[-1] = feat_t[-1] - 0.5
    out = build_distiller('pkt', feat_s, feat_t, make_opt())(feat_s, feat_t, *logits(), BATCH)
    close(out, pkt_ref(feat_s[-1], feat_t[-1]), atol=1e-8)


# ---------------------------------------------------------------- 2) where the gradient goes

# student feature indices each adapter must use (feature lists of length 5)
USED = {
    'hint': {1}, 'attention': {1, 2, 3}, 'similarity': {3}, 'correlation': {4},
    'vid': {1, 2, 3}, 'rkd': {4}, 'pkt': {4},
}


@pytest.mark.parametrize('name', sorted(USED))
def test_gradient_reaches_student_and_adapter_not_teacher(name):
    feat_s, feat_t = feature_lists()
    distiller = build_distiller(name, feat_s, feat_t, make_opt())
    feat_s = [f.clone().requires_grad_() for f in feat_s]
    # the loop gives no-grad teacher features; these ask for grad to prove the adapter takes none
    feat_t = [f.clone().requires_grad_() for f in feat_t]
    loss = distiller(feat_s, feat_t, *logits(), BATCH)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for i, f in enumerate(feat_s):
        if i in USED[name]:
            assert f.grad is not None and f.grad.abs().sum() > 0, 'student feature {} got no gradient'.format(i)
        else:
            assert f.grad is None, 'student feature {} should be unused'.format(i)
    assert all(f.grad is None for f in feat_t), 'a gradient reached the teacher features'
    for pname, p in distiller.named_parameters():
        assert p.grad is not None, pname
        if pname == 'regressor.conv.bias':
            continue  # a bias before train-mode BatchNorm has a zero gradient by construction
        assert p.grad.abs().sum() > 0, '{} got no gradient'.format(pname)
    own = {n for n, _ in distiller.named_parameters()}
    if name == 'hint':
        assert {'regressor.conv.weight', 'regressor.bn.weight', 'regressor.bn.bias'} <= own
    elif name == 'correlation':  # quirk 17: the teacher-side embedding is trained too
        assert own == {'embed_s.linear.weight', 'embed_s.linear.bias', 'embed_t.linear.weight', 'embed_t.linear.bias'}
    elif name == 'vid':
        assert len(own) == 3 * 4  # three convs and a log_scale per stage pair
    else:
        assert own == set()


def test_kd_term_gradient_reaches_only_the_student_logits():
    y_s, y_t = logits()
    y_s.requires_grad_()
    DistillKL(4.0)(y_s, y_t).backward()
    assert y_s.grad.abs().sum() > 0 and y_t.grad is None


# ---------------------------------------------------------------- 3) a few training steps

@pytest.fixture(scope='module')
def pair():
    """A fixed batch and a fixed wrn_16_1 teacher with its outputs on that batch."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    teacher = model_dict['wrn_16_1'](num_classes=10).eval()
    with torch.no_grad():
        feat_t, logit_t = teacher(x, is_feat=True)
    return x, teacher, feat_t, logit_t


# -b weights of the reference sweep (from the method files), so every term has a trainable scale
BETA = {name: reference_weights(name)['beta'] for name in MY_METHODS}


@pytest.mark.parametrize('name', MY_METHODS)
def test_training_steps_lower_the_distillation_term(name, pair):
    x, teacher, feat_t, logit_t = pair
    torch.manual_seed(1)
    student = model_dict['resnet8'](num_classes=10)
    opt = make_opt(batch_size=8)
    student.eval()
    with torch.no_grad():
        probe_s, _ = student(x[:2], is_feat=True)
        probe_t, _ = teacher(x[:2], is_feat=True)
    distiller = build_distiller(name, probe_s, probe_t, opt)
    student.train()
    kd = DistillKL(opt.kd_T)
    params = list(student.parameters()) + list(distiller.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    batch = {'target': torch.zeros(8, dtype=torch.long)}
    before = {n: p.detach().clone() for n, p in distiller.named_parameters()}

    def term():
        feat_s, logit_s = student(x, is_feat=True)
        if name == 'kd':  # KD's loss is the loop's -a term; its adapter adds nothing
            assert distiller(feat_s, feat_t, logit_s, logit_t, batch).item() == 0.0
            return kd(logit_s, logit_t)
        return BETA[name] * distiller(feat_s, feat_t, logit_s, logit_t, batch)

    history = []
    for _ in range(10):
        loss = term()
        history.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        history.append(term().item())
    assert all(math.isfinite(v) for v in history), history
    if name == 'vid':
        # Most of VID's value is 0.5*log(variance) averaged over all channels, and at lr 0.05 the
        # variances move slowly: the term falls a little, but at every step.
        assert all(b < a for a, b in zip(history, history[1:])), 'vid did not fall: {}'.format(history)
    else:
        assert history[-1] < 0.7 * history[0], '{} did not fall: {}'.format(name, history)
    assert all(p.grad is None for p in teacher.parameters())
    for n, p in distiller.named_parameters():
        if n != 'regressor.conv.bias':  # zero gradient before train-mode BatchNorm
            assert not torch.equal(p.detach(), before[n]), '{} was not trained'.format(n)
