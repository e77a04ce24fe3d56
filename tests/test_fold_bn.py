"""The BN-folded teacher computes what the teacher computes, for every model of the zoo.

Ground truth is the unfolded network itself: logits, every ``is_feat`` feature and every
``preact`` feature of the folded copy must equal the original's to float rounding, with
BatchNorm statistics and affine parameters drawn at random (freshly built networks have
identity BatchNorms, which would hide a wrong fold). Networks skip their own initialisation
and are filled once, and every network sees 32x32 inputs (the ImageNet ones pool adaptively; one
image for those), so the whole zoo, resnet34x4's 340M weights included, takes about a minute.
"""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import train_student
from helper import fold_bn as fold_module
from helper.fold_bn import FoldError, fold_bn, frozen_teacher
from models import build_model, model_dict


def imagenet_shaped(name):
    return name == 'ResNet50' or 'imagenet' in model_dict[name].__module__.lower()


def random_model(name, seed=0, num_classes=10):
    """``name`` with every weight, bias and BatchNorm statistic drawn at random (He-scaled weights)."""
    with pytest.MonkeyPatch.context() as patch:
        # the models' own initialisation is overwritten below: skip it (resnet34x4 has 340M weights)
        for fn in ('kaiming_normal_', 'kaiming_uniform_', 'normal_', 'uniform_', 'constant_', 'ones_', 'zeros_'):
            patch.setattr(nn.init, fn, lambda tensor, *args, **kwargs: tensor)
        model = build_model(name, num_classes, dataset='imagenet' if imagenet_shaped(name) else 'cifar100')
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # He-scaled uniform (uniform_ is the cheap draw: VGG's classifier has 120M weights)
                bound = math.sqrt(6.0 / module.weight[0].numel())
                module.weight.uniform_(-bound, bound, generator=g)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1, generator=g)
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.3, generator=g)
                module.running_var.uniform_(0.3, 3.0, generator=g)
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0, 0.3, generator=g)
                module.num_batches_tracked.zero_()
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    assert all(isinstance(m, kinds) for m in model.modules() if list(m.parameters(recurse=False))), \
        'a layer random_model does not fill'
    return model.eval()


def outputs(model, x):
    with torch.no_grad():
        logits = model(x)
        feats, logits_f = model(x, is_feat=True)
        pre, logits_p = model(x, is_feat=True, preact=True)
    return [logits, logits_f, logits_p] + list(feats) + list(pre)


def batch_norms(model):
    return {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def wrn_preactivation_bns(model):
    """WRN's BatchNorms that follow an addition (each block's bn1 and the final bn1): not foldable."""
    return {name for name in batch_norms(model) if name.endswith('bn1')}


@pytest.mark.parametrize('name', sorted(model_dict))
def test_folded_copy_gives_the_same_logits_and_features(name):
    torch.manual_seed(1)
    model = random_model(name)
    x = torch.randn(1 if imagenet_shaped(name) else 2, 3, 32, 32)
    folded = fold_bn(model, x)

    expected, got = outputs(model, x), outputs(folded, x)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape
        # float32 rounding of the folded weights, accumulated over the depth of the network
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg='output {}'.format(i))

    # every BatchNorm that follows a convolution is gone; WRN's pre-activation ones stay
    left = batch_norms(folded)
    assert left == (wrn_preactivation_bns(model) if name.startswith('wrn_') and name != 'wrn_50_2' else set())
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())


def test_fold_keeps_the_original_and_its_bn_modules():
    model = random_model('resnet8x4')
    model.train()
    bns = model.get_bn_before_relu()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_bn(model, torch.randn(2, 3, 32, 32))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # methods that read the teacher's modules (OFD, the classifier) get the original, still intact
    assert model.training, 'fold_bn restores the train/eval mode it found'
    assert model.get_bn_before_relu() == bns and all(isinstance(b, nn.BatchNorm2d) for b in bns)
    assert all(isinstance(b, nn.Identity) for b in folded.get_bn_before_relu())
    assert folded.fc is not model.fc and torch.equal(folded.fc.weight, model.fc.weight)


class TwoReaders(nn.Module):
    """A conv output that a feature and a shortcut also read: its BatchNorm must stay."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x, is_feat=False, preact=False):
        a = self.conv1(x)               # returned as a feature too
        b = torch.relu(self.bn1(a))
        c = self.conv2(b)               # read by the shortcut too
        d = self.bn2(c) + c
        e = self.bn3(self.conv3(d))     # the only foldable pair
        logits = e.mean(dim=(2, 3))
        return ([a, d, e], logits) if is_feat else logits


def test_a_conv_output_read_elsewhere_keeps_its_batchnorm():
    torch.manual_seed(0)
    model = TwoReaders().eval()
    for bn in (model.bn1, model.bn2, model.bn3):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    folded = fold_bn(model, x)
    assert batch_norms(folded) == {'bn1', 'bn2'}
    for a, b in zip(outputs(folded, x), outputs(model, x)):
        torch.testing.assert_close(a, b)
    # bn3 folded by the formula: w * gamma / sqrt(var + eps), bias beta - mean * gamma / sqrt(var + eps)
    bn = model.bn3
    s = [g / math.sqrt(v + bn.eps) for g, v in zip(bn.weight.tolist(), bn.running_var.tolist())]
    w = model.conv3.weight.detach()
    for o in range(4):
        torch.testing.assert_close(folded.conv3.weight[o], w[o] * s[o])
        assert math.isclose(folded.conv3.bias[o].item(), bn.bias[o].item() - bn.running_mean[o].item() * s[o],
                            rel_tol=1e-5, abs_tol=1e-6)


def test_a_wrong_fold_is_refused_and_the_teacher_runs_unfolded(monkeypatch):
    model = random_model('wrn_16_2')
    # WRN's stem output is also a feature and a shortcut: pairing it with the first block's bn1 is wrong
    monkeypatch.setattr(fold_module, '_conv_bn_pairs',
                        lambda m, x: ({'block1.layer.0.bn1': 'conv1'}, fold_module._outputs(m, x)))
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(FoldError):
        fold_bn(model, x)
    lines = []
    assert frozen_teacher(model, x, log=lines.append) is model
    assert 'unfolded' in lines[0]
    assert frozen_teacher(model, x, fold=False) is model


@pytest.fixture(scope='module')
def path_t(tmp_path_factory):
    folder = tmp_path_factory.mktemp('fold') / 'resnet8x4_vanilla'
    folder.mkdir()
    torch.save({'model': random_model('resnet8x4', num_classes=100).state_dict()}, folder / 'ckpt.pth')
    return folder / 'ckpt.pth'


def built(path_t, tmp_path, *flags):
    opt = train_student.parse_option([
        '--path-t', str(path_t), '--model_s', 'resnet8', '--distill', 'semckd', '-b', '400', '--dataset',
        'synthetic', '--synthetic_train_size', '16', '--synthetic_val_size', '8', '--batch_size', '8',
        '--num_workers', '0', '--seed', '1', '--save_root', str(tmp_path)] + list(flags))
    opt.distributed, opt.rank, opt.world_size, opt.local_rank = False, 0, 1, 0
    torch.manual_seed(1)
    return opt, train_student.build_trainer(opt, torch.device('cpu'))


def test_runs_fold_the_teacher_by_default_and_record_it(path_t, tmp_path):
    opt, trainer = built(path_t, tmp_path)
    assert opt.fold_teacher and not batch_norms(trainer.objective.model_t)
    opt_off, trainer_off = built(path_t, tmp_path, '--no_fold_teacher')
    assert not opt_off.fold_teacher and len(batch_norms(trainer_off.objective.model_t)) == 10
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(trainer.objective.model_t(x), trainer_off.objective.model_t(x), rtol=1e-4,
                               atol=1e-5)
    os.makedirs(opt.save_folder, exist_ok=True)
    trainer.write_parameters()
    params = json.load(open(os.path.join(opt.save_folder, 'parameters.json')))
    assert params['fold_teacher'] is True and params['channels_last'] in (True, False)
