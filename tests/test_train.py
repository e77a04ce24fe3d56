"""End to end: a synthetic teacher, then a student per method (each run's main(argv), in this process)."""
import json
import os

import pytest
import torch

import train_student
from conftest import TEACHER_DATA, run_in_process
from distiller_zoo import method_table

SMALL = TEACHER_DATA


def read_metrics(folder):
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def teacher(teacher_run, tmp_path_factory):
    """The session's resnet8 teacher (two epochs on the synthetic set) and a folder for students:
    (cwd, teacher run folder, teacher stdout)."""
    folder, stdout = teacher_run
    return tmp_path_factory.mktemp('students'), folder, stdout


def test_teacher_run_writes_every_output(teacher):
    cwd, folder, stdout = teacher
    for name in ['resnet8_best.pth', 'resnet8_last.pth', 'ckpt_epoch_2.pth', 'metrics.jsonl',
                 'test_best_metrics.json', 'parameters.json']:
        assert (folder / name).is_file(), name
    assert any(p.name.startswith('events.out.tfevents') for p in (folder / 'tensorboard').iterdir())
    metrics = read_metrics(folder)
    assert [m['epoch'] for m in metrics] == [1, 2]
    best = json.loads((folder / 'test_best_metrics.json').read_text())
    assert best['test_acc'] == max(m['test_acc'] for m in metrics)
    params = json.loads((folder / 'parameters.json').read_text())
    assert params['model'] == 'resnet8' and params['total_time_s'] > 0
    # the printed epoch summary carries the same accuracy as the metrics file
    assert 'test acc@1 {:.2f}'.format(metrics[-1]['test_acc']) in stdout


def test_teacher_checkpoint_reloads_and_reproduces_its_accuracy(teacher):
    from dataset import get_dataloaders
    from helper.loops import validate
    from helper.options import add_common_args, finish_common
    from models import model_dict
    import argparse
    _, folder, _ = teacher
    ckpt = torch.load(folder / 'resnet8_best.pth', map_location='cpu', weights_only=False)
    model = model_dict['resnet8'](num_classes=100)
    model.load_state_dict(ckpt['model'], strict=True)
    opt = finish_common(add_common_args(argparse.ArgumentParser()).parse_args(SMALL), 'resnet8')
    opt.distributed, opt.world_size, opt.rank = False, 1, 0
    _, val_loader, _, _ = get_dataloaders(opt)
    acc, _, _ = validate(val_loader, model, opt, torch.device('cpu'))
    best = json.loads((folder / 'test_best_metrics.json').read_text())
    assert acc == pytest.approx(best['test_acc'], abs=1e-6)
    assert ckpt['epoch'] == best['epoch']


TINY = ['--dataset', 'synthetic', '--synthetic_train_size', '96', '--synthetic_val_size', '64',
        '--batch_size', '32', '--num_workers', '0', '--print-freq', '2', '--epochs', '1', '--nce_k', '32',
        '--skip-validation', '--init_epochs', '1']
# every registered method's reference weights, from its file in distiller_zoo (the one place)
METHOD_WEIGHTS = {m: row['weights'] for m, row in method_table().items()}


def student_folder(cwd, model_s, model_t, distill, beta, trial='0', gamma=1, alpha=1):
    return cwd / 'save' / 'student_model' / 'S:{}_T:{}_synthetic_{}_r:{}_a:{}_b:{}_{}'.format(
        model_s, model_t, distill, float(gamma), float(alpha), float(beta), trial)


def test_every_method_declares_its_facts():
    from distiller_zoo import DISTILLERS
    assert {'kd', 'hint', 'attention', 'similarity', 'correlation', 'vid', 'rkd', 'pkt', 'crd', 'irg', 'hkd',
            'semckd'} <= set(DISTILLERS)
    for name, cls in DISTILLERS.items():
        assert cls.display_name and cls.source, name
        assert set(cls.weights) == {'gamma', 'alpha', 'beta'}, name


@pytest.mark.parametrize('distill', sorted(METHOD_WEIGHTS))
def test_student_run_for_every_method(teacher, distill):
    cwd, folder, _ = teacher
    w = METHOD_WEIGHTS[distill]
    run_in_process(train_student.main, ['--path-t', folder / 'resnet8_best.pth', '--model_s', 'wrn_16_1',
                                        '--distill', distill, '-r', w['gamma'], '-a', w['alpha'], '-b', w['beta']]
                   + TINY, cwd)
    out = student_folder(cwd, 'wrn_16_1', 'resnet8', distill, w['beta'], gamma=w['gamma'], alpha=w['alpha'])
    metrics = read_metrics(out)
    assert [m['epoch'] for m in metrics] == [1]
    assert all(torch.isfinite(torch.tensor(m['train_loss'])) for m in metrics)
    ckpt = torch.load(out / 'wrn_16_1_best.pth', map_location='cpu', weights_only=False)
    from models import model_dict
    model_dict['wrn_16_1'](num_classes=100).load_state_dict(ckpt['model'], strict=True)
    assert 'distiller' in ckpt and ckpt['opt']['distill'] == distill and ckpt['opt']['model_s'] == 'wrn_16_1'
    last = torch.load(out / 'wrn_16_1_last.pth', map_location='cpu', weights_only=False)
    assert {'optimizer', 'rng', 'distiller', 'epoch', 'best_acc'} <= set(last)
    assert isinstance(last['data_seed'], int)  # a resumed run keeps the epoch order of an unseeded run


def test_hkd_two_pass_recipe(teacher):
    """pkt into an intermediate student, then hkd from that student's run folder (teacher parsed from S:...)."""
    cwd, folder, _ = teacher
    # the recipe's intermediate network is resnet8x4, 16x resnet8's cost per image: a smaller set
    tiny = TINY[:]
    for flag, value in (('--synthetic_train_size', '32'), ('--synthetic_val_size', '16'), ('--batch_size', '16')):
        tiny[tiny.index(flag) + 1] = value
    run_in_process(train_student.main, ['--path-t', folder / 'resnet8_best.pth', '--model_s', 'resnet8x4',
                                        '--distill', 'pkt', '-b', '30000', '--trial', 'p1'] + tiny, cwd)
    first = student_folder(cwd, 'resnet8x4', 'resnet8', 'pkt', 30000, 'p1')
    stdout = run_in_process(train_student.main, ['--path-t', first / 'resnet8x4_best.pth', '--model_s', 'resnet8',
                                                 '--distill', 'hkd', '-b', '1', '--trial', 'p2'] + tiny, cwd)
    assert 'teacher resnet8x4' in stdout
    assert (student_folder(cwd, 'resnet8', 'resnet8x4', 'hkd', 1, 'p2') / 'resnet8_best.pth').is_file()
