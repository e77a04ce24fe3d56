"""scripts/model_transform.py: torchvision checkpoints become teacher files our models load strictly."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from models import model_dict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, 'scripts', 'model_transform.py')


def _load_script():
    spec = importlib.util.spec_from_file_location('model_transform', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT] + list(args), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def _randomise_bn(model, seed=0):
    """Give BatchNorm non-trivial statistics so that eval-mode outputs test every buffer."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


def _same_logits(ours, theirs, size=64):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


def test_resnet18_raw_torchvision_state_dict(tmp_path):
    tv = _randomise_bn(torchvision.models.resnet18())
    src = tmp_path / 'resnet18.pth'
    torch.save(tv.state_dict(), src)
    dst = tmp_path / 'out' / 'resnet18_transformed.pth'

    proc = _run('--model', 'ResNet18', '--src', str(src), '--dst', str(dst))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and str(dst) in proc.stdout
    # written atomically: only the final file is left in the folder
    assert os.listdir(dst.parent) == [dst.name]

    ckpt = torch.load(dst, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'model'}
    ours = model_dict['ResNet18'](num_classes=1000)
    ours.load_state_dict(ckpt['model'], strict=True)
    _same_logits(ours, tv)


def test_resnet34_old_style_file_without_bn_counters(tmp_path, capsys):
    # like resnet34-333f7ec4.pth: legacy (pre-zip) format, no num_batches_tracked entries;
    # run in-process (main) to spare a second interpreter start
    tv = _randomise_bn(torchvision.models.resnet34(), seed=2)
    old = {k: v for k, v in tv.state_dict().items() if not k.endswith('num_batches_tracked')}
    src = tmp_path / 'resnet34-333f7ec4.pth'
    torch.save(old, src, _use_new_zipfile_serialization=False)
    dst = tmp_path / 'save' / 'models' / 'ResNet34_vanilla' / 'resnet34_transformed.pth'

    assert _load_script().main(['--model', 'ResNet34', '--src', str(src), '--dst', str(dst)]) == 0, \
        capsys.readouterr().err

    state = torch.load(dst, map_location='cpu', weights_only=True)['model']
    ours = model_dict['ResNet34'](num_classes=1000)
    # the counters are filled in, so the file is a complete state_dict
    assert list(state) == list(ours.state_dict())
    ours.load_state_dict(state, strict=True)
    _same_logits(ours, tv)


def test_missing_src_fails_with_one_line(tmp_path):
    dst = tmp_path / 'out.pth'
    proc = _run('--model', 'ResNet34', '--src', str(tmp_path / 'nope.pth'), '--dst', str(dst))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'nope.pth' in lines[0] and 'Traceback' not in proc.stderr
    assert not dst.exists()


def test_mismatched_keys_are_named_and_nothing_is_written(tmp_path, capsys):
    script = _load_script()
    src = tmp_path / 'resnet18.pth'
    torch.save(torchvision.models.resnet18().state_dict(), src)
    dst = tmp_path / 'out.pth'

    assert script.main(['--model', 'ResNet34', '--src', str(src), '--dst', str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert 'layer1.2.bn1.bias' in err  # ResNet34's third block of layer1 is absent from ResNet18
    assert not dst.exists() and os.listdir(tmp_path) == ['resnet18.pth']

    assert script.main(['--model', 'ResNet18', '--src', str(src), '--dst', str(dst), '--num_classes', '10']) == 2
    assert 'fc.weight' in capsys.readouterr().err
    assert not dst.exists()


def test_wrapped_and_data_parallel_checkpoints_are_unwrapped():
    script = _load_script()
    sd = torchvision.models.resnet18().state_dict()
    for ckpt in ({'state_dict': sd}, {'model': {'module.' + k: v for k, v in sd.items()}, 'epoch': 90}):
        assert list(script.extract_state_dict(ckpt)) == list(sd)
    with pytest.raises(script.UserError, match='not tensors'):
        script.extract_state_dict({'epoch': 90, 'best_acc': 0.7})


@pytest.mark.parametrize('ours_name, tv_name', [
    ('MobileNetV2_Imagenet', 'mobilenet_v2'),
    ('shufflenet_v2_x0_5', 'shufflenet_v2_x0_5'),
    ('vgg11_imagenet', 'vgg11_bn'),
])
def test_other_families_match_torchvision(ours_name, tv_name):
    script = _load_script()
    tv = _randomise_bn(getattr(torchvision.models, tv_name)())
    ours = script.convert(script.extract_state_dict(tv.state_dict()), ours_name)
    size = 32 if ours_name.startswith('vgg') else 64
    _same_logits(ours, tv, size=size)
    if ours_name.startswith('vgg'):
        # The reference's taps between a BatchNorm and its (in-place) ReLU hand on the post-ReLU
        # map: the first tap is conv1 -> bn -> relu, the fourth ends after conv3's relu.
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            feats, _ = ours(x, is_feat=True)
            assert torch.equal(feats[0], tv.features[:3](x))
            assert torch.equal(feats[3], tv.features[:11](x))
