"""Mixed precision: the models may run in bf16/fp16, every loss term stays a float32 computation.

resnet32x4 -> resnet8x4 at random init gives the feature magnitudes that made fp16 overflow
(Gram matrices, distances) and bf16 lose most digits (RKD, PKT, HKD) while the losses ran
under autocast. The two networks run once per precision; each method's objective then sees
those very outputs (the low-precision ones under autocast, as in training) and each of its
terms must be finite and close to the same objective on the float32 outputs.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_student
from distiller_zoo import DISTILLERS, build_distiller
from helper.loops import DistillObjective, as_terms
from models import model_dict

BATCH = 8
N_DATA = 64
# relative error allowed per term against the all-float32 run (measured: at most 1 %, RKD in bf16)
RTOL = 0.03


class Replay(nn.Module):
    """Stands in for a network: returns the (features, logits) it was given."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, is_feat=False, preact=False):
        return self.out


@pytest.fixture(scope='module')
def setting(tmp_path_factory):
    """The run options, the batch, and the networks' outputs per precision (None = float32)."""
    folder = tmp_path_factory.mktemp('amp') / 'resnet32x4_vanilla'
    folder.mkdir()
    path_t = folder / 'ckpt.pth'
    path_t.write_bytes(b'')  # parse_option only checks that the teacher file exists
    opt = train_student.parse_option(['--path-t', str(path_t), '--model_s', 'resnet8x4', '--dataset', 'synthetic',
                                      '--batch_size', str(BATCH), '--nce_k', '16'])
    opt.n_data = N_DATA
    torch.manual_seed(0)
    model_t, model_s = model_dict['resnet32x4'](num_classes=100), model_dict['resnet8x4'](num_classes=100)
    model_t.eval()   # the frozen teacher, as DistillObjective runs it
    model_s.train()  # the student normalises with batch statistics
    x = torch.randn(BATCH, 3, 32, 32)
    g = torch.Generator().manual_seed(1)
    batch = {'target': torch.randint(100, (BATCH,), generator=g),
             'index': torch.randperm(N_DATA, generator=g)[:BATCH],
             'contrast_idx': torch.randint(N_DATA, (BATCH, opt.nce_k + 1), generator=g)}
    batch['contrast_idx'][:, 0] = batch['index']
    outputs = {}
    for dtype in (None, torch.bfloat16, torch.float16):
        with torch.no_grad(), torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            outputs[dtype] = (model_s(x, is_feat=True), model_t(x, is_feat=True))
    batch['views'] = [x]  # the extra view of methods that have one (the objective runs it like x)
    return opt, x, batch, outputs, (model_s, model_t)


def test_networks_really_ran_in_low_precision(setting):
    _, _, _, outputs, _ = setting
    for dtype in (torch.bfloat16, torch.float16):
        (feat_s, logit_s), (feat_t, logit_t) = outputs[dtype]
        assert logit_s.dtype == logit_t.dtype == dtype
        assert feat_s[-1].dtype == dtype and feat_t[1].dtype == dtype


def terms_of(distiller, outputs, opt, x, batch, dtype):
    """The objective's terms (and total) on replayed network outputs, under autocast ``dtype``."""
    (feat_s, logit_s), (feat_t, logit_t) = outputs
    objective = DistillObjective(Replay((feat_s, logit_s)), Replay((feat_t, logit_t)), distiller, opt)
    objective.train()
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss, _, terms = objective(x, batch)
    assert loss.dtype == torch.float32
    return {name: value.detach().double() for name, value in dict(terms, loss=loss).items()}


def float32_terms(distiller, outputs, opt, batch):
    """The same terms written out, without autocast, on float32 copies of the outputs."""
    (feat_s, logit_s), (feat_t, logit_t) = outputs
    feat_s, feat_t = [f.float() for f in feat_s], [f.float() for f in feat_t]
    logit_s, logit_t = logit_s.float(), logit_t.float()
    if distiller.extra_views:
        batch = dict(batch, view_outputs=[(feat_s, feat_t, logit_s, logit_t) for _ in batch['views']])
    terms = {'cls': F.cross_entropy(logit_s, batch['target'])}
    if not distiller.replaces_kd:
        T = opt.kd_T
        p_t = torch.softmax(logit_t / T, dim=1)
        terms['div'] = (p_t * (torch.log_softmax(logit_t / T, 1) - torch.log_softmax(logit_s / T, 1))).sum(1).mean() * T * T
    terms.update(as_terms(distiller(feat_s, feat_t, logit_s, logit_t, batch)))
    return terms


def total_of(terms, opt):
    """gamma * CE + alpha * KL + beta * (the method's terms), from named terms."""
    method = sum(v for k, v in terms.items() if k not in ('cls', 'div', 'loss'))
    return opt.gamma * terms['cls'] + opt.alpha * terms.get('div', 0) + opt.beta * method


def scaled(outputs, scale):
    """Every feature map times ``scale`` (a power of two: exact in every precision)."""
    (feat_s, logit_s), (feat_t, logit_t) = outputs
    return ([f * scale for f in feat_s], logit_s), ([f * scale for f in feat_t], logit_t)


def built(distill, opt, outputs, models):
    opt = copy.copy(opt)
    opt.distill = distill
    torch.manual_seed(2)
    (feat_s, _), (feat_t, _) = outputs[None]
    model_s, model_t = copy.deepcopy(models)  # some methods change the student (CAT-KD drops its bias)
    return build_distiller(distill, feat_s, feat_t, opt, model_s=model_s, model_t=model_t), opt


@pytest.mark.parametrize('distill', sorted(DISTILLERS))
def test_every_term_is_a_float32_computation_under_autocast(setting, distill):
    """Autocast around the objective changes no term: each is what float32 arithmetic gives on
    float32 copies of the low-precision outputs (before the fix: NaN for SP, SemCKD, IRG, RKD in
    fp16, and several-fold errors for RKD, PKT in bf16)."""
    opt, x, batch, outputs, models = setting
    distiller, opt = built(distill, opt, outputs, models)
    for dtype in (torch.bfloat16, torch.float16):
        got = terms_of(copy.deepcopy(distiller), outputs[dtype], opt, x, batch, dtype)
        # a fresh copy per call: CRD's memory and SemCKD's BN statistics change in a forward pass
        want = float32_terms(copy.deepcopy(distiller), outputs[dtype], opt, batch)
        assert torch.isfinite(got['loss']), (distill, dtype, got)
        for name, value in want.items():
            assert abs(got[name] - value.double()) <= 1e-5 * abs(value.double()) + 1e-7, (
                distill, dtype, name, float(got[name]), float(value))
        total = total_of(want, opt)
        assert abs(got['loss'] - total.double()) <= 1e-5 * abs(total.double()) + 1e-7


@pytest.mark.parametrize('distill', sorted(DISTILLERS))
def test_every_term_is_close_to_float32_models(setting, distill):
    """Models in bf16/fp16, losses in float32: each term within 3 % of the all-float32 value.

    HKD runs on the feature maps times 2^-8. Its pairwise distances (the reference's
    ``|a|^2 + |b|^2 - 2ab``) cancel on the diagonal with a float32 error far above their
    eps at these norms: on the very same float32 inputs, float32 and float64 give HKD values
    50 % apart, so no model precision can come closer than that. Scaled down, the formula
    is well conditioned (float32 = float64 to 0.2 %) and the comparison means something.
    """
    opt, x, batch, outputs, models = setting
    if distill == 'hkd':
        outputs = {dtype: scaled(out, 2.0 ** -8) for dtype, out in outputs.items()}
    distiller, opt = built(distill, opt, outputs, models)
    if distill == 'mlkd':
        # MLKD weights its terms by the share of samples (classes) whose teacher confidence is at most
        # the batch's median: with 8 samples a rounding that reorders two near-median confidences moves
        # that share by 1/8, a step of the formula, not an error of precision. The teacher's float32
        # outputs keep the shares equal; the student's stay in low precision.
        outputs = {dtype: (out[0], outputs[None][1]) for dtype, out in outputs.items()}
    reference = terms_of(copy.deepcopy(distiller), outputs[None], opt, x, batch, None)
    assert all(torch.isfinite(v) for v in reference.values()), reference
    for dtype in (torch.bfloat16, torch.float16):
        got = terms_of(copy.deepcopy(distiller), outputs[dtype], opt, x, batch, dtype)
        assert got.keys() == reference.keys()
        for name, want in reference.items():
            assert torch.isfinite(got[name]), (distill, dtype, name, got)
            assert abs(got[name] - want) <= RTOL * abs(want) + 1e-6, (distill, dtype, name, float(got[name]),
                                                                      float(want))
