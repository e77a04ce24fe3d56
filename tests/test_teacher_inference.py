"""The teacher as the training step runs it on the CPU, and its accuracy measured once.

Ground truth for the TorchScript teacher is the unfolded network itself (random weights and BatchNorm
statistics): logits, ``is_feat`` and ``preact`` features equal to float rounding, at batch sizes other
than the one traced. Ground truth for the kept accuracy is the measurement of a run that did measure.
"""
import json
import os
import re

import pytest
import torch

import train_student
from conftest import TEACHER_DATA, run_in_process
from helper.fold_bn import FoldError, ScriptedTeacher, fold_bn, scripted_teacher
from test_fold_bn import random_model

# one model of each family file of models/ (resnet, resnetv2, wrn, vgg, mobilenetv2, ShuffleNet v1/v2)
FAMILIES = ['resnet32x4', 'ResNet18', 'wrn_16_2', 'vgg8', 'MobileNetV2', 'ShuffleV1', 'ShuffleV2']


@pytest.mark.parametrize('name', FAMILIES)
def test_scripted_teacher_computes_what_the_teacher_computes(name):
    model = random_model(name, num_classes=100).requires_grad_(False)
    cl = torch.channels_last
    probe = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=cl)
    folded = fold_bn(model, probe[:1]).to(memory_format=cl)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=cl)
    for preact in (False, True):
        teacher = scripted_teacher(folded, probe, preact)
        assert isinstance(teacher, ScriptedTeacher)
        with torch.no_grad():
            feats, logits = teacher(x, is_feat=True, preact=preact)
            feats_ref, logits_ref = model(x, is_feat=True, preact=preact)
            # validation asks for the logits alone, whatever mode was traced
            alone = teacher(x)
            # the other preact mode than traced runs the eager folded model
            other, _ = teacher(x, is_feat=True, preact=not preact)
            other_ref, _ = model(x, is_feat=True, preact=not preact)
        assert len(feats) == len(feats_ref) and len(other) == len(other_ref)
        for a, b in zip(feats + [logits, alone] + other, feats_ref + [logits_ref, logits_ref] + other_ref):
            assert a.shape == b.shape
            assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (name, preact)


def test_scripted_teacher_refuses_a_model_it_cannot_trace():
    class Branchy(torch.nn.Module):
        """Its output depends on a value, which a trace would freeze."""

        def forward(self, x, is_feat=False, preact=False):
            y = x * 2 if x.sum() > 0 else x * 3
            return ([y], y.mean((1, 2, 3))) if is_feat else y.mean((1, 2, 3))

    probe = torch.cat([torch.ones(2, 3, 4, 4), -torch.ones(1, 3, 4, 4) * 10])
    with pytest.raises(FoldError):
        scripted_teacher(Branchy(), probe)


def student_args(path_t, save_root, *extra):
    # the shared teacher's data set (TEACHER_DATA): synthetic, 256 training and 128 test images
    return ['--path-t', path_t, '--distill', 'kd', '--model_s', 'resnet8', '--epochs', '1', '--save_root',
            save_root] + TEACHER_DATA + list(extra)


def test_the_cpu_run_uses_the_scripted_teacher(teacher_run, tmp_path):
    folder, _ = teacher_run
    path_t = str(folder / 'resnet8_last.pth')
    for extra, form in (([], 'folded, TorchScript'), (['--no_fold_teacher'], 'as is'),
                        (['--amp', 'bf16'], 'folded')):
        opt = train_student.parse_option(student_args(path_t, str(tmp_path), *extra))
        trainer = train_student.build_trainer(opt, torch.device('cpu'))
        assert opt.teacher_form == form
        assert isinstance(trainer.objective.model_t, ScriptedTeacher) == (form == 'folded, TorchScript')


def test_teacher_accuracy_is_measured_once_per_checkpoint_and_test_set(teacher_run, tmp_path):
    folder, _ = teacher_run
    path_t = str(tmp_path / 'resnet8_vanilla' / 'ckpt.pth')
    os.makedirs(os.path.dirname(path_t))
    with open(folder / 'resnet8_last.pth', 'rb') as src, open(path_t, 'wb') as dst:
        dst.write(src.read())

    def run(*extra):
        out = run_in_process(train_student.main, student_args(path_t, 'save', *extra), tmp_path)
        (line,) = [l for l in out.splitlines() if l.startswith('teacher accuracy')]
        return line

    first = run('--trial', '0')
    assert 'earlier run' not in first
    acc = re.match(r'teacher accuracy: ([\d.]+) \(acc@5 ([\d.]+)', first).groups()
    (entry,) = json.loads((tmp_path / 'save' / 'teacher_accuracy.json').read_text()).values()
    assert ['{:.2f}'.format(entry['acc']), '{:.2f}'.format(entry['acc_top5'])] == list(acc)
    # another run with the same teacher and test set reads it, and prints the same numbers
    second = run('--trial', '1', '--distill', 'pkt')
    assert 'earlier run' in second and second.startswith(first)
    # measured again: when asked, for another test set, for a rewritten checkpoint
    assert 'earlier run' not in run('--trial', '2', '--revalidate_teacher')
    assert 'earlier run' not in run('--trial', '3', '--synthetic_val_size', '96')
    assert 'earlier run' in run('--trial', '4')
    st = os.stat(path_t)
    os.utime(path_t, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert 'earlier run' not in run('--trial', '5')
    assert len(json.loads((tmp_path / 'save' / 'teacher_accuracy.json').read_text())) == 3
