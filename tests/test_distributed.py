"""DDP on CPU with gloo, both launch styles: the reference's mp.spawn flag and torchrun."""
import argparse
import json
import os
import sys

import pytest
import torch

from conftest import REPO, run_script

SMALL = ['--dataset', 'synthetic', '--synthetic_train_size', '128', '--synthetic_val_size', '50',
         '--batch_size', '32', '--num_workers', '0', '--print-freq', '1']


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('ddp')
    run_script('train_teacher.py', ['--model', 'resnet8', '--epochs', '1', '--seed', '0'] + SMALL, cwd)
    return cwd, cwd / 'save' / 'models' / 'resnet8_synthetic_lr_0.05_decay_0.0005_trial_0' / 'resnet8_best.pth'


def run_student_on_two_processes(style, args, cwd, port):
    """train_student.py on 2 gloo processes: spawned by the script itself (the reference's
    ``--multiprocessing-distributed``, here with ``--cpu_procs``) or by torchrun."""
    if style == 'spawn':
        return run_script('train_student.py', args + ['--multiprocessing-distributed', '--cpu_procs', '2',
                                                      '--dist-url', 'tcp://127.0.0.1:{}'.format(port)], cwd)
    return run_script('-m', ['torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port + 1),
                             os.path.join(REPO, 'train_student.py')] + args, cwd)


def student_folder(cwd, distill, beta, trial):
    return cwd / 'save' / 'student_model' / 'S:wrn_16_1_T:resnet8_synthetic_{}_r:1.0_a:1.0_b:{}_{}'.format(
        distill, float(beta), trial)


@pytest.mark.parametrize('style', ['spawn', 'torchrun'])
def test_distilled_run_finishes_and_only_rank0_writes(teacher, style, tmp_path):
    cwd, path_t = teacher
    args = ['--path-t', path_t, '--model_s', 'wrn_16_1', '--distill', 'crd', '-b', '0.8', '--epochs', '2',
            '--nce_k', '16', '--trial', style] + SMALL
    proc = run_student_on_two_processes(style, args, cwd, port=29531)
    out = student_folder(cwd, 'crd', 0.8, style)
    metrics = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert [m['epoch'] for m in metrics] == [1, 2]  # one writer: no duplicated epoch lines
    # only rank 0 prints: each epoch summary appears once
    assert proc.stdout.count(' * epoch 1 ') == 1 and proc.stdout.count('best accuracy') == 1
    params = json.loads((out / 'parameters.json').read_text())
    assert params['world_size'] == 2 and params['batch_size'] == 16  # the global batch is split
    assert sorted(p.name for p in out.iterdir() if p.suffix == '.pth') == [
        'ckpt_epoch_2.pth', 'wrn_16_1_best.pth', 'wrn_16_1_last.pth']


@pytest.mark.parametrize('distill', ['semckd', 'crd'])
def test_replicas_identical_after_a_step_and_reduced_accuracy_is_exact(teacher, tmp_path, distill):
    cwd, path_t = teacher
    args = ['--path-t', path_t, '--model_s', 'wrn_16_1', '--distill', distill, '-b', '1', '--seed', '3',
            '--nce_k', '16', '--skip-validation'] + SMALL
    run_script('-m', ['torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29533',
                      os.path.join(REPO, 'tests', 'ddp_check.py'), tmp_path] + args, cwd)
    result = torch.load(tmp_path / 'ddp_check.pth', weights_only=False)
    a, b = result['replicas']
    assert a.numel() > 100_000 and torch.equal(a, b)  # student and the method's modules, bit for bit
    if distill == 'crd':  # memory banks and constants updated with the global batch on every process
        bank_a, bank_b = result['buffers']
        assert bank_a.numel() > 1000 and torch.equal(bank_a, bank_b)
    # the accuracy reduced over two unequal shards (25 + 25 images, batches 16+9) equals one process's
    from dataset import get_dataloaders
    from helper.loops import validate
    from helper.options import add_common_args, finish_common
    from models import model_dict
    opt = finish_common(add_common_args(argparse.ArgumentParser()).parse_args(SMALL), 'wrn_16_1')
    opt.distributed, opt.world_size, opt.rank = False, 1, 0
    _, val_loader, _, _ = get_dataloaders(opt)
    model = model_dict['wrn_16_1'](num_classes=100)
    model.load_state_dict(result['student'])
    single = validate(val_loader, model, opt, torch.device('cpu'))
    acc1, acc5, loss = result['acc']
    assert (acc1, acc5) == pytest.approx(single[:2], abs=1e-9) and acc5 > 0
    assert loss == pytest.approx(single[2], rel=1e-5)  # float32 sums in another order


@pytest.fixture(scope='module')
def imagenet_run(tmp_path_factory):
    """A tiny ImageFolder and the reference's ImageNet teacher file: torchvision's ResNet34 (untrained
    here) turned into ``ResNet34_vanilla/resnet34_transformed.pth`` by scripts/model_transform.py."""
    pytest.importorskip('nvidia.dali')
    import torchvision
    from fake_data import write_fake_imagefolder
    cwd = tmp_path_factory.mktemp('imagenet_ddp')
    write_fake_imagefolder(cwd / 'imagenet', classes=4, per_class=4, size=(64, 48))
    src = cwd / 'resnet34-333f7ec4.pth'
    torch.save(torchvision.models.resnet34().state_dict(), src)
    teacher = cwd / 'save' / 'models' / 'ResNet34_vanilla' / 'resnet34_transformed.pth'
    run_script(os.path.join('scripts', 'model_transform.py'),
               ['--model', 'ResNet34', '--src', src, '--dst', teacher], cwd)
    return cwd, teacher


@pytest.mark.parametrize('style', ['spawn', 'torchrun'])
def test_reference_imagenet_command_scaled_to_two_cpu_processes(imagenet_run, style):
    """The README's 8-GPU SemCKD ResNet34 -> ResNet18 command, with 2 gloo processes instead of 8 GPUs, a
    16-image ImageFolder and ``--dali cpu``; every other flag as the reference gives it."""
    cwd, teacher = imagenet_run
    args = ['--path-t', teacher, '--batch_size', '8', '--epochs', '1', '--dataset', 'imagenet',
            '--data_folder', cwd, '--print-freq', '1', '--num_workers', '2', '--distill', 'semckd',
            '--model_s', 'ResNet18', '-r', '1', '-a', '1', '-b', '50', '--trial', style, '--learning_rate', '0.1',
            '--lr_decay_epochs', '30,60', '--weight_decay', '1e-4', '--dali', 'cpu']
    proc = run_student_on_two_processes(style, args, cwd, port=29534)
    assert 'teacher accuracy' in proc.stdout  # the reference validates the teacher first
    out = cwd / 'save' / 'student_model' / 'S:ResNet18_T:ResNet34_imagenet_semckd_r:1.0_a:1.0_b:50.0_{}'.format(
        style)
    params = json.loads((out / 'parameters.json').read_text())
    assert params['world_size'] == 2 and params['batch_size'] == 4 and params['dali'] == 'cpu'
    # 16 images, 8 per process, 4 per step: both processes take two steps
    assert 'Epoch [1][2/2]' in proc.stdout and 'Epoch [1][3/' not in proc.stdout
    (metrics,) = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    best = torch.load(out / 'ResNet18_best.pth', weights_only=False)
    assert best['epoch'] == 1 and best['accuracy'] == metrics['test_acc']
    from models import model_dict
    model_dict['ResNet18'](num_classes=1000).load_state_dict(best['model'], strict=True)
    assert any(k.startswith('self_attention.regressor3_3') for k in best['distiller'])
