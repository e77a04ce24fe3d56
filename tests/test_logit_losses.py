"""DKD, DIST, logit standardisation, MLKD and CTKD losses against independent computations.

Every loss is recomputed in float64 numpy from its formula, by a different route than the implementation
(explicit per-sample loops, np.corrcoef, einsum Gram matrices, the DKD identity KD = TCKD + (1 - p_t) NCKD,
finite differences for the reversed gradient), at realistic logit magnitudes (N(0, 5) over 100 classes).
The strong augmentation's operations are checked pixel by pixel against their definitions.
"""
import math
import random
from importlib import import_module

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

# the modules themselves: the package may export a loss under its module's name (distiller_zoo.DIST)
ctkd, dist, dkd, ls, mlkd = (import_module('distiller_zoo.' + name)
                             for name in ('CTKD', 'DIST', 'DKD', 'LS', 'MLKD'))
from helper.errors import UserError
from models import model_dict

B, C = 16, 100


def make_logits(seed, batch=B, classes=C, scale=5.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, classes, generator=g, dtype=dtype)


def make_target(seed, batch=B, classes=C):
    return torch.randint(classes, (batch,), generator=torch.Generator().manual_seed(seed))


def log_softmax_np(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_rows_np(z_s, z_t, T):
    """KL(softmax(z_t / T) || softmax(z_s / T)) per row, one row at a time."""
    out = []
    for s_row, t_row in zip(z_s, z_t):
        log_p_s, log_p_t = log_softmax_np(s_row / T), log_softmax_np(t_row / T)
        out.append(float(np.sum(np.exp(log_p_t) * (log_p_t - log_p_s))))
    return np.array(out)


def standardise_np(z):
    return (z - z.mean(axis=1, keepdims=True)) / (1e-7 + z.std(axis=1, ddof=1, keepdims=True))


# ---------------------------------------------------------------- DKD

def dkd_by_hand(z_s, z_t, y, alpha, beta, T):
    """Per sample: TCKD on the binary (target, rest) distributions, NCKD on the softmax of the non-target
    logits alone (the target column deleted, not masked)."""
    total = 0.0
    for s_row, t_row, label in zip(z_s, z_t, y):
        p_s, p_t = np.exp(log_softmax_np(s_row / T)), np.exp(log_softmax_np(t_row / T))
        b_s = np.array([p_s[label], 1.0 - p_s[label]])
        b_t = np.array([p_t[label], 1.0 - p_t[label]])
        tckd = np.sum(b_t * np.log(b_t / b_s))
        keep = np.arange(len(s_row)) != label
        log_q_s, log_q_t = log_softmax_np(s_row[keep] / T), log_softmax_np(t_row[keep] / T)
        nckd = np.sum(np.exp(log_q_t) * (log_q_t - log_q_s))
        total += alpha * tckd + beta * nckd
    return T ** 2 * total / len(y)


@pytest.mark.parametrize('alpha,beta,T', [(1.0, 8.0, 4.0), (9.0, 18.0, 2.0), (0.5, 2.0, 1.0)])
def test_dkd_loss_matches_tckd_and_nckd_by_hand(alpha, beta, T):
    z_s, z_t, y = make_logits(0), make_logits(1), make_target(2)
    expected = dkd_by_hand(z_s.numpy(), z_t.numpy(), y.numpy(), alpha, beta, T)
    assert dkd.dkd_loss(z_s, z_t, y, alpha, beta, T).item() == pytest.approx(expected, rel=1e-9)
    # float32, as training computes it
    got32 = dkd.dkd_loss(z_s.float(), z_t.float(), y, alpha, beta, T).item()
    assert got32 == pytest.approx(expected, rel=1e-4)


def test_dkd_parts_recompose_kd():
    """The paper's identity: KD = TCKD + (1 - p_t[target]) * NCKD for every sample."""
    T = 4.0
    z_s, z_t, y = make_logits(3, batch=6), make_logits(4, batch=6), make_target(5, batch=6)
    kd = T ** 2 * kl_rows_np(z_s.numpy(), z_t.numpy(), T)
    for i in range(6):
        s, t, label = z_s[i:i + 1], z_t[i:i + 1], y[i:i + 1]
        tckd = dkd.dkd_loss(s, t, label, 1.0, 0.0, T).item()
        nckd = dkd.dkd_loss(s, t, label, 0.0, 1.0, T).item()
        p_target = torch.softmax(t / T, dim=1)[0, label].item()
        assert tckd + (1.0 - p_target) * nckd == pytest.approx(kd[i], rel=1e-9)


def test_dkd_gradcheck():
    z_s = make_logits(6, batch=4, classes=10).requires_grad_()
    z_t, y = make_logits(7, batch=4, classes=10), make_target(8, batch=4, classes=10)
    assert torch.autograd.gradcheck(lambda s: dkd.dkd_loss(s, z_t, y, 1.0, 8.0, 4.0), (z_s,))


def test_dkd_warmup_is_linear_from_the_first_epoch():
    assert dkd.warmup_factor(1) == pytest.approx(1 / 20)
    assert dkd.warmup_factor(10) == pytest.approx(0.5)
    assert dkd.warmup_factor(20) == 1.0 and dkd.warmup_factor(240) == 1.0


# ---------------------------------------------------------------- DIST

def pearson_np(a, b, eps=1e-8):
    """Correlation of two vectors, 1e-8 added to the product of the centred norms (the reference's)."""
    a, b = a - a.mean(), b - b.mean()
    return float(np.dot(a, b) / (math.sqrt(np.dot(a, a)) * math.sqrt(np.dot(b, b)) + eps))


def dist_by_hand(z_s, z_t, beta, gamma, tau):
    y_s, y_t = np.exp(log_softmax_np(z_s / tau)), np.exp(log_softmax_np(z_t / tau))
    rows = [pearson_np(a, b) for a, b in zip(y_s, y_t)]      # per sample, over classes
    cols = [pearson_np(a, b) for a, b in zip(y_s.T, y_t.T)]  # per class, over the batch
    return tau ** 2 * (beta * (1 - np.mean(rows)) + gamma * (1 - np.mean(cols)))


def test_dist_relations_are_pearson_correlations():
    """At tau = 4 the 1e-8 is negligible and the relations are numpy's correlation coefficients."""
    z_s, z_t = make_logits(14), make_logits(15)
    y_s, y_t = (np.exp(log_softmax_np(z.numpy() / 4.0)) for z in (z_s, z_t))
    inter = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(y_s, y_t)])
    intra = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(y_s.T, y_t.T)])
    assert dist.DIST(1.0, 0.0, 4.0)(z_s, z_t).item() == pytest.approx(16 * inter, rel=1e-6)
    assert dist.DIST(0.0, 1.0, 4.0)(z_s, z_t).item() == pytest.approx(16 * intra, rel=1e-6)


@pytest.mark.parametrize('beta,gamma,tau', [(1.0, 1.0, 4.0), (0.7, 1.3, 1.0), (2.0, 0.5, 2.0)])
def test_dist_matches_corrcoef(beta, gamma, tau):
    z_s, z_t = make_logits(10), make_logits(11)
    expected = dist_by_hand(z_s.numpy(), z_t.numpy(), beta, gamma, tau)
    assert dist.DIST(beta, gamma, tau)(z_s, z_t).item() == pytest.approx(expected, rel=1e-9)
    assert dist.DIST(beta, gamma, tau)(z_s.float(), z_t.float()).item() == pytest.approx(expected, rel=1e-4)


def test_dist_defaults_and_cifar_config():
    loss = dist.DIST()
    assert (loss.beta, loss.gamma, loss.tau) == (1.0, 1.0, 1.0)
    assert (dist.BETA, dist.GAMMA, dist.TAU, dist.KD_WEIGHT, dist.CE_WEIGHT) == (1.0, 1.0, 4.0, 2.0, 1.0)


def test_dist_gradcheck():
    z_s = make_logits(12, batch=6, classes=10).requires_grad_()
    z_t = make_logits(13, batch=6, classes=10)
    assert torch.autograd.gradcheck(lambda s: dist.DIST(1.0, 1.0, 4.0)(s, z_t), (z_s,))


# ---------------------------------------------------------------- logit standardisation

def test_normalize_matches_numpy_unbiased_std():
    z = make_logits(20)
    expected = standardise_np(z.numpy())
    np.testing.assert_allclose(ls.normalize(z).numpy(), expected, rtol=1e-12, atol=1e-12)
    biased = (z.numpy() - z.numpy().mean(1, keepdims=True)) / (1e-7 + z.numpy().std(1, keepdims=True))
    assert not np.allclose(ls.normalize(z).numpy(), biased, rtol=1e-4)


@pytest.mark.parametrize('logit_stand', [False, True])
@pytest.mark.parametrize('T', [1.0, 2.0, 4.0])
def test_kd_loss_matches_per_sample_kl(T, logit_stand):
    z_s, z_t = make_logits(21), make_logits(22)
    s_np, t_np = z_s.numpy(), z_t.numpy()
    if logit_stand:
        s_np, t_np = standardise_np(s_np), standardise_np(t_np)
    per_sample = T ** 2 * kl_rows_np(s_np, t_np, T)
    got = ls.kd_loss(z_s, z_t, T, reduce=False, logit_stand=logit_stand)
    np.testing.assert_allclose(got.numpy(), per_sample, rtol=1e-9)
    assert ls.kd_loss(z_s, z_t, T, logit_stand=logit_stand).item() == pytest.approx(per_sample.mean(), rel=1e-9)
    got32 = ls.kd_loss(z_s.float(), z_t.float(), T, logit_stand=logit_stand).item()
    assert got32 == pytest.approx(per_sample.mean(), rel=1e-4)


def test_kd_loss_takes_a_tensor_temperature():
    z_s, z_t = make_logits(23), make_logits(24)
    T = torch.tensor([3.0], dtype=torch.float64)
    expected = 9.0 * kl_rows_np(z_s.numpy(), z_t.numpy(), 3.0).mean()
    assert ls.kd_loss(z_s, z_t, T).item() == pytest.approx(expected, rel=1e-9)


def test_ls_settings_fall_back_to_the_readme_defaults():
    assert ls.ls_settings('kd', 'resnet32x4', 'resnet8x4') == (2.0, 9.0)
    assert ls.ls_settings('kd', 'resnet110', 'resnet20') == (4.0, 12.0)
    assert ls.ls_settings('dkd', 'resnet56', 'resnet20') == (3.0, 18.0, 2.0)
    assert ls.ls_settings('mlkd', 'vgg13', 'vgg8') == (2.0, 6.0)
    assert ls.ls_settings('kd', 'resnet8', 'resnet8') == (ls.BASE_TEMP, ls.KD_WEIGHT)
    assert ls.ls_settings('dkd', 'resnet8', 'resnet8') == (ls.BASE_TEMP, ls.KD_WEIGHT, None)


def test_every_table_names_models_we_have():
    tables = [dkd.CIFAR_PAIRS, ls.KD_PAIRS, ls.DKD_PAIRS, ls.MLKD_PAIRS, mlkd.CIFAR_PAIRS]
    for table in tables:
        for model_t, model_s in table:
            assert model_t in model_dict and model_s in model_dict, (model_t, model_s)


# ---------------------------------------------------------------- MLKD

def test_cc_and_bc_losses_match_gram_matrices():
    z_s, z_t = make_logits(30), make_logits(31)
    for T in (1.0, 4.0):
        p_s, p_t = np.exp(log_softmax_np(z_s.numpy() / T)), np.exp(log_softmax_np(z_t.numpy() / T))
        class_gram = np.einsum('bi,bj->ij', p_t, p_t) - np.einsum('bi,bj->ij', p_s, p_s)
        batch_gram = np.einsum('ic,jc->ij', p_t, p_t) - np.einsum('ic,jc->ij', p_s, p_s)
        assert mlkd.cc_loss(z_s, z_t, T).item() == pytest.approx((class_gram ** 2).sum() / C, rel=1e-9)
        assert mlkd.bc_loss(z_s, z_t, T).item() == pytest.approx((batch_gram ** 2).sum() / B, rel=1e-9)
        np.testing.assert_allclose(mlkd.cc_loss(z_s, z_t, T, reduce=False).numpy(), class_gram ** 2 / C,
                                   rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(mlkd.bc_loss(z_s, z_t, T, reduce=False).numpy(), batch_gram ** 2 / B,
                                   rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize('batch', [15, 16])
def test_confidence_masks_match_numpy_percentile(batch):
    z_t = make_logits(32, batch=batch, dtype=torch.float32)
    p = np.exp(log_softmax_np(z_t.double().numpy()))
    conf, class_conf = p.max(1), p.sum(0)
    sample_mask, class_mask = mlkd.confidence_masks(z_t)
    np.testing.assert_array_equal(sample_mask.numpy(), conf <= np.percentile(conf, 50))
    np.testing.assert_array_equal(class_mask.numpy(), class_conf <= np.percentile(class_conf, 50))


def mlkd_by_hand(s_w, t_w, s_s, t_s, base_T, weight, logit_stand):
    """The reference's forward_train, term by term: each masked term is (scalar * mask).mean()."""
    p_t = np.exp(log_softmax_np(t_w))
    conf, class_conf = p_t.max(1), p_t.sum(0)
    mask = (conf <= np.percentile(conf, 50)).astype(float)
    class_mask = (class_conf <= np.percentile(class_conf, 50)).astype(float)

    def kd(s, t, T):
        if logit_stand:
            s, t = standardise_np(s), standardise_np(t)
        return T ** 2 * kl_rows_np(s, t, T).mean()

    def gram_loss(s, t, T, classes):
        p_s, p_t = np.exp(log_softmax_np(s / T)), np.exp(log_softmax_np(t / T))
        if classes:
            return ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum() / s.shape[1]
        return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / s.shape[0]

    temps = [base_T, 3.0, 5.0, 2.0, 6.0]
    kd_weak = sum(weight * (kd(s_w, t_w, T) * mask).mean() for T in temps)
    kd_strong = (sum(weight * kd(s_s, t_s, T) for T in temps[:3])
                 + sum(weight * kd(s_w, t_w, T) for T in temps[3:]))
    cc = sum(weight * (gram_loss(s_w, t_w, T, True) * class_mask).mean() for T in temps)
    bc = sum(weight * (gram_loss(s_w, t_w, T, False) * mask).mean() for T in temps)
    return {'kd': kd_weak + kd_strong, 'cc': cc, 'bc': bc}


@pytest.mark.parametrize('base_T,weight,logit_stand', [(4.0, 0.9, False), (2.0, 9.0, True)])
def test_mlkd_loss_matches_the_reference_structure(base_T, weight, logit_stand):
    s_w, t_w, s_s, t_s = (make_logits(seed) for seed in (40, 41, 42, 43))
    expected = mlkd_by_hand(*(x.numpy() for x in (s_w, t_w, s_s, t_s)), base_T, weight, logit_stand)
    got = mlkd.mlkd_loss(s_w, t_w, s_s, t_s, temperature=base_T, kd_weight=weight, logit_stand=logit_stand)
    assert set(got) == {'kd', 'cc', 'bc'}
    for name in got:
        assert got[name].item() == pytest.approx(expected[name], rel=1e-9), name
    got32 = mlkd.mlkd_loss(s_w.float(), t_w.float(), s_s.float(), t_s.float(), temperature=base_T,
                           kd_weight=weight, logit_stand=logit_stand)
    for name in got32:
        assert got32[name].item() == pytest.approx(expected[name], rel=1e-4), name


def test_mlkd_strong_view_reaches_only_the_kd_term():
    s_w, t_w, t_s = make_logits(44), make_logits(45), make_logits(46)
    s_s = make_logits(47).requires_grad_()
    losses = mlkd.mlkd_loss(s_w, t_w, s_s, t_s)
    assert not (losses['cc'].requires_grad or losses['bc'].requires_grad)
    losses['kd'].backward()
    assert s_s.grad.abs().sum() > 0


# ---- the strong augmentation

def ramp_image(size=32):
    """Every pixel distinct: R = x * 7, G = y * 7, B = (x + y) * 3 (mod 256)."""
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([(x * 7) % 256, (y * 7) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def affine_nearest_np(arr, a, b, c, d, e, f):
    """Nearest-neighbour affine: output pixel centre (x + 1/2, y + 1/2) reads the input pixel containing
    (a x' + b y' + c, d x' + e y' + f); zero outside. (Use coefficients that are exact binary fractions:
    PIL accumulates the coordinates row by row, so a point that lands exactly on a pixel border after
    inexact arithmetic may fall either way.)"""
    h, w = arr.shape[:2]
    out = np.zeros_like(arr)
    for y in range(h):
        for x in range(w):
            xi = math.floor(a * (x + 0.5) + b * (y + 0.5) + c)
            yi = math.floor(d * (x + 0.5) + e * (y + 0.5) + f)
            if 0 <= xi < w and 0 <= yi < h:
                out[y, x] = arr[yi, xi]
    return out


def test_geometric_operations_move_pixels_as_the_reference_defines():
    img = ramp_image()
    arr = np.asarray(img)
    shifted = np.zeros_like(arr)
    shifted[:, :24] = arr[:, 8:]  # translate_x(0.25) on 32 pixels: output x reads input x + 8
    np.testing.assert_array_equal(np.asarray(mlkd.translate_x(img, 0.25)), shifted)
    shifted = np.zeros_like(arr)
    shifted[8:] = arr[:24]        # translate_y(-0.25): output y reads input y - 8
    np.testing.assert_array_equal(np.asarray(mlkd.translate_y(img, -0.25)), shifted)
    np.testing.assert_array_equal(np.asarray(mlkd.shear_x(img, 0.25)),
                                  affine_nearest_np(arr, 1, 0.25, 0, 0, 1, 0))
    np.testing.assert_array_equal(np.asarray(mlkd.shear_y(img, -0.125)),
                                  affine_nearest_np(arr, 1, 0, 0, -0.125, 1, 0))


def test_posterize_keeps_the_integer_part_of_the_magnitude():
    img = ramp_image()
    np.testing.assert_array_equal(np.asarray(mlkd.posterize(img, 5.99)),
                                  np.asarray(img) & np.uint8(0b11111000))


def test_cutout_paints_a_grey_square(monkeypatch):
    draws = iter([0.75, 0.5])     # centre x = 32 - 31 * 0.75 = 8.75, y = 32 - 31 * 0.5 = 16.5
    monkeypatch.setattr(mlkd.random, 'random', lambda: next(draws))
    img = ramp_image()
    out = np.asarray(mlkd.cutout(img, 0.375))  # side 12: x0 = int(8.75 - 6) = 2, y0 = int(16.5 - 6) = 10
    expected = np.asarray(img).copy()
    expected[10:23, 2:15] = (125, 123, 114)    # PIL rectangles include both corners: 2..14, 10..22
    np.testing.assert_array_equal(out, expected)
    assert mlkd.cutout(img, 0.0) is img


def test_randaugment_draws_ops_magnitudes_then_cutout(monkeypatch):
    chosen = [(mlkd.translate_x, -0.3, 0.3), (mlkd.solarize, 0, 256)]
    monkeypatch.setattr(mlkd.random, 'choices', lambda population, k: chosen[:k])
    # translate 0.15 (= -0.3 + 0.6 * 0.75) -> 4.8 px; solarize above 128 (= 256 * 0.5); cutout size 0
    draws = iter([0.75, 0.5, 0.0])
    monkeypatch.setattr(mlkd.random, 'random', lambda: next(draws))
    img = ramp_image()
    expected = affine_nearest_np(np.asarray(img), 1, 0, 4.8, 0, 1, 0)
    expected = np.asarray(ImageOps.solarize(Image.fromarray(expected), 128))
    np.testing.assert_array_equal(np.asarray(mlkd.RandAugment(2, 10)(img)), expected)


def test_strong_transform_outputs_normalised_views():
    random.seed(0)
    torch.manual_seed(0)
    img = ramp_image()
    views = torch.stack([mlkd.strong_transform('cifar100')(img) for _ in range(20)])
    assert views.shape == (20, 3, 32, 32) and views.dtype == torch.float32
    assert not torch.equal(views[0], views[1])
    from dataset.synthetic import SyntheticImages
    assert mlkd.strong_transform('synthetic')(SyntheticImages(4).image(0)).shape == (3, 32, 32)
    with pytest.raises(UserError):
        mlkd.strong_transform('mnist')


# ---------------------------------------------------------------- CTKD

def test_lambda_schedule_is_the_published_cosine():
    for epoch in (1, 3, 5, 9, 10, 11, 240):
        expected = -1.0 + (math.cos(math.pi * min(epoch, 10) / 10) + 1.0) / 2.0
        assert ctkd.lambda_schedule(epoch) == pytest.approx(expected, abs=1e-15)
    # the value the reference run logged for epoch 1 (logit-standardization-KD logs/CTKD/*.txt)
    assert ctkd.lambda_schedule(1) == pytest.approx(-0.02447174185242318, abs=1e-15)
    assert ctkd.CosineDecay(0.0, -1.0, 10).get_value(-3) == 0.0


def test_initial_temperature():
    module = ctkd.Global_T()
    temp = ctkd.ctkd_temperature(module(None, None, -1.0))
    assert temp.item() == pytest.approx(1.0 + 20.0 / (1.0 + math.exp(-1.0)), rel=1e-6)


@pytest.mark.parametrize('lambda_', [-0.5, -1.0, 0.3])
def test_temperature_gets_lambda_times_the_true_gradient(lambda_):
    z_s, z_t = make_logits(50), make_logits(51)
    z_s.requires_grad_()
    module = ctkd.Global_T().double()
    with torch.no_grad():
        module.global_T.fill_(0.4)
    loss = ctkd.ctkd_loss(z_s, z_t, ctkd.ctkd_temperature(module(z_t, z_s, lambda_)))
    assert loss.dim() == 0
    loss.backward()

    def loss_at(theta):
        T = 1.0 + 20.0 / (1.0 + math.exp(-theta))
        return T ** 2 * kl_rows_np(z_s.detach().numpy(), z_t.numpy(), T).mean()

    h = 1e-5
    true_grad = (loss_at(0.4 + h) - loss_at(0.4 - h)) / (2 * h)
    assert module.global_T.grad.item() == pytest.approx(lambda_ * true_grad, rel=1e-5)
    # the student's gradient is the plain one, whatever lambda
    z_s2 = z_s.detach().clone().requires_grad_()
    T = torch.tensor([1.0 + 20.0 / (1.0 + math.exp(-0.4))], dtype=torch.float64)
    ls.kd_loss(z_s2, z_t, T).sum().backward()
    torch.testing.assert_close(z_s.grad, z_s2.grad)


def test_gradient_reversal_is_the_identity_forward():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.equal(ctkd.GradientReversal()(x, -0.7), x)
    assert torch.autograd.gradcheck(lambda v: ctkd.GradientReversal()(v, 1.0), (x,))
