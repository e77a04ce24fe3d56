"""Never lose a run: bad input fails in one line, runs resume exactly, files are written atomically."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script, script_env

SMALL = ['--dataset', 'synthetic', '--synthetic_train_size', '96', '--synthetic_val_size', '64',
         '--batch_size', '32', '--num_workers', '0', '--print-freq', '1']


def tree_state(root):
    """Names, sizes and content hashes of every file under ``root``."""
    state = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                state[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return state


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A teacher run (resnet8, one epoch) and a finished kd student run to protect."""
    cwd = tmp_path_factory.mktemp('robust')
    run_script('train_teacher.py', ['--model', 'resnet8', '--epochs', '1', '--seed', '0'] + SMALL, cwd)
    teacher = cwd / 'save' / 'models' / 'resnet8_synthetic_lr_0.05_decay_0.0005_trial_0' / 'resnet8_best.pth'
    run_script('train_student.py', ['--path-t', teacher, '--model_s', 'resnet8', '--distill', 'kd', '--epochs', '1',
                                    '--skip-validation'] + SMALL, cwd)
    return cwd, teacher


def student_args(teacher, *extra):
    return ['--path-t', teacher, '--model_s', 'resnet8', '--distill', 'kd', '--epochs', '1',
            '--skip-validation'] + SMALL + list(extra)


def bad_inputs(cwd, teacher):
    """(name, script, args, words the message must contain)."""
    junk = cwd / 'junk'
    junk.mkdir(exist_ok=True)
    (junk / 'resnet8_vanilla').mkdir(exist_ok=True)
    (junk / 'resnet8_vanilla' / 'empty.pth').write_bytes(b'')
    (junk / 'resnet8_vanilla' / 'notes.pth').write_text('this is not a checkpoint\n')
    (junk / 'wrn_16_1_vanilla').mkdir(exist_ok=True)
    wrong = junk / 'wrn_16_1_vanilla' / 'ckpt.pth'
    wrong.write_bytes(teacher.read_bytes())  # a resnet8 checkpoint in a wrn_16_1 folder
    (junk / 'cifar-empty').mkdir(exist_ok=True)
    corrupt = junk / 'cifar-corrupt' / 'cifar-100-python'
    corrupt.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, os.path.join(REPO, 'tests'))
    from fake_data import write_fake_cifar100, write_fake_imagefolder
    write_fake_cifar100(junk / 'cifar-corrupt', n_train=20, n_test=10)
    data = (corrupt / 'train').read_bytes()
    (corrupt / 'train').write_bytes(data[:len(data) // 2])
    noimg = junk / 'imagefolder-empty'
    for split in ('train', 'val'):
        (noimg / split / 'class_a').mkdir(parents=True, exist_ok=True)
    (junk / 'not-a-dir').write_text('a file where the save folder should be')
    kd_last = cwd / 'save' / 'student_model' / 'S:resnet8_T:resnet8_synthetic_kd_r:1.0_a:1.0_b:0.0_0' / 'resnet8_last.pth'
    return [
        ('missing teacher', 'train_student.py', student_args(cwd / 'nope' / 'resnet8_vanilla' / 'x.pth'),
         ['does not exist']),
        ('empty teacher', 'train_student.py', student_args(junk / 'resnet8_vanilla' / 'empty.pth'),
         ['not a readable', 'checkpoint']),
        ('text teacher', 'train_student.py', student_args(junk / 'resnet8_vanilla' / 'notes.pth'),
         ['not a readable', 'checkpoint']),
        ('wrong architecture', 'train_student.py', student_args(wrong), ['does not match', 'missing']),
        ('unknown model_s', 'train_student.py', student_args(teacher, '--model_s', 'resnet9'),
         ['unknown --model_s', 'resnet8x4']),
        ('unknown distill', 'train_student.py', student_args(teacher, '--distill', 'semkd'),
         ['unknown --distill', 'semckd']),
        ('unknown model', 'train_teacher.py', ['--model', 'resnet9'] + SMALL, ['unknown --model', 'wrn_40_2']),
        ('no cifar, no network', 'train_teacher.py',
         ['--model', 'resnet8', '--dataset', 'cifar100', '--data_folder', junk / 'cifar-empty', '--num_workers', '0'],
         ['CIFAR-100', 'download']),
        ('corrupt cifar', 'train_teacher.py',
         ['--model', 'resnet8', '--dataset', 'cifar100', '--data_folder', junk / 'cifar-corrupt',
          '--num_workers', '0'], ['train']),
        ('imagefolder without images', 'train_teacher.py',
         ['--model', 'resnet8', '--dataset', 'imagenette', '--data_folder', noimg, '--num_workers', '0'],
         ['image']),
        ('hint layer out of range', 'train_student.py',
         student_args(teacher, '--distill', 'hint', '--hint_layer', '7'), ['hint_layer']),
        ('zero batch size', 'train_teacher.py', ['--model', 'resnet8', '--batch_size', '0'], ['--batch_size']),
        ('negative batch size', 'train_student.py', student_args(teacher, '--batch_size', '-4'), ['--batch_size']),
        ('decreasing lr decay', 'train_teacher.py', ['--model', 'resnet8', '--lr_decay_epochs', '180,150'],
         ['--lr_decay_epochs', 'increasing']),
        ('resume of another method', 'train_student.py',
         student_args(teacher, '--distill', 'attention', '--resume', kd_last), ['resume', 'kd']),
        ('resume of another model', 'train_student.py',
         student_args(teacher, '--model_s', 'wrn_16_1', '--resume', kd_last), ['resume', 'resnet8']),
        ('missing gpu', 'train_teacher.py', ['--model', 'resnet8', '--gpu_id', '7'] + SMALL, ['--gpu_id', 'GPU']),
        ('unwritable save folder', 'train_teacher.py',
         ['--model', 'resnet8', '--epochs', '1', '--save_root', junk / 'not-a-dir'] + SMALL, ['save_root']),
    ]


def test_bad_input_one_line_nonzero_exit_nothing_touched(workspace):
    cwd, teacher = workspace
    cases = bad_inputs(cwd, teacher)
    before = tree_state(cwd / 'save')
    # no network for the download case: every connection goes to a closed local port
    env = script_env(http_proxy='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9',
                     HTTP_PROXY='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9')
    messages = {}
    for name, script, args, words in cases:
        proc = subprocess.run([sys.executable, os.path.join(REPO, script)] + [str(a) for a in args], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=300)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode != 0, name
        assert len(err) == 1 and err[0].startswith('error: '), (name, proc.stderr)
        for word in words:
            assert word.lower() in err[0].lower(), (name, word, err[0])
        messages[name] = err[0]
        assert tree_state(cwd / 'save') == before, name
    print(json.dumps(messages, indent=1))


def run_until_killed(args, cwd, watch_file):
    """Start a run and SIGKILL it as soon as ``watch_file`` appears (the end of its first epoch)."""
    # the same environment as run_script, or the compared runs differ in their last bits
    env = script_env()
    proc = subprocess.Popen([sys.executable] + [str(a) for a in args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not os.path.exists(watch_file):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def strip_times(records):
    return [{k: v for k, v in r.items() if not k.endswith('time_s')} for r in records]


@pytest.mark.parametrize('distill', ['kd', 'crd', 'semckd'])
def test_killed_and_resumed_run_equals_uninterrupted_run(workspace, tmp_path, distill):
    _, teacher = workspace
    beta = {'kd': 0, 'crd': 0.8, 'semckd': 400}[distill]
    args = [os.path.join(REPO, 'train_student.py'), '--path-t', teacher, '--model_s', 'resnet8', '--distill', distill,
            '-b', beta, '--epochs', '2', '--deterministic', '--nce_k', '16', '--skip-validation'] + SMALL
    folder_name = 'S:resnet8_T:resnet8_synthetic_{}_r:1.0_a:1.0_b:{}_0'.format(distill, float(beta))
    whole, broken = tmp_path / 'whole', tmp_path / 'broken'
    whole.mkdir(), broken.mkdir()
    run_script(args[0], args[1:], whole)
    last = broken / 'save' / 'student_model' / folder_name / 'resnet8_last.pth'
    run_until_killed(args, broken, last)
    run_script(args[0], args[1:] + ['--resume', 'auto'], broken)

    a = torch.load(whole / 'save' / 'student_model' / folder_name / 'resnet8_last.pth', weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a['epoch'] == b['epoch'] == 2
    for key in ('model', 'distiller'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.allclose(a[key][name].double(), b[key][name].double(), rtol=0, atol=1e-6), (key, name)
    metrics = [strip_times([json.loads(x) for x in open(root / 'save' / 'student_model' / folder_name /
                                                         'metrics.jsonl')]) for root in (whole, broken)]
    assert [m['epoch'] for m in metrics[1]] == [1, 2]
    assert len(metrics[0]) == 2
    for x, y in zip(*metrics):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=1e-6), k


def test_interrupted_checkpoint_write_keeps_previous_file(tmp_path, monkeypatch):
    """A failure in the middle of writing never replaces (or truncates) the previous checkpoint."""
    from helper.util import save_checkpoint, save_dict_to_json
    path = tmp_path / 'model_last.pth'
    save_checkpoint({'model': {'w': torch.ones(1000)}, 'epoch': 1}, path)
    original_save = torch.save

    def dying_save(obj, f, *a, **k):
        original_save({'partial': torch.zeros(10)}, f)
        f.write(b'x' * 1000)
        raise KeyboardInterrupt  # as if killed mid-write
    monkeypatch.setattr(torch, 'save', dying_save)
    for _ in range(5):
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint({'model': {'w': torch.zeros(1000)}, 'epoch': 2}, path)
    monkeypatch.setattr(torch, 'save', original_save)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt['epoch'] == 1 and torch.equal(ckpt['model']['w'], torch.ones(1000))
    assert os.listdir(tmp_path) == ['model_last.pth']  # no temporary files left behind
    save_dict_to_json({'test_acc': 1.0}, tmp_path / 'm.json')
    assert json.loads((tmp_path / 'm.json').read_text()) == {'test_acc': 1.0}


def test_sigkill_during_large_checkpoint_writes(tmp_path):
    """Kill a writer process at many moments while it rewrites a large checkpoint: the file always loads."""
    path = tmp_path / 'big.pth'
    code = ('import sys, torch; sys.path.insert(0, {!r}); from helper.util import save_checkpoint\n'
            'i = 0\n'
            'while True:\n'
            '    i += 1\n'
            '    save_checkpoint({{"w": torch.full((4_000_000,), float(i)), "i": i}}, {!r})\n'
            '    if i == 1:\n'
            '        print("first", flush=True)\n').format(REPO, str(path))
    seen = []
    for delay in (0.0, 0.03, 0.07, 0.11, 0.17, 0.23, 0.31, 0.43):
        proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b'first'
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(path, weights_only=False)
        assert torch.all(ckpt['w'] == float(ckpt['i']))
        seen.append(ckpt['i'])
        assert [p.name for p in tmp_path.iterdir() if not p.name.startswith('.')] == ['big.pth']
    assert max(seen) > 1  # kills did land while later versions were being written


def test_nan_loss_stops_with_epoch_step_and_term_and_keeps_last_checkpoint(workspace, tmp_path):
    _, teacher = workspace
    run_script('train_student.py', student_args(teacher, '--distill', 'attention', '-b', '1000'), tmp_path)
    folder = tmp_path / 'save' / 'student_model' / 'S:resnet8_T:resnet8_synthetic_attention_r:1.0_a:1.0_b:1000.0_0'
    good = (folder / 'resnet8_last.pth').read_bytes()
    args = student_args(teacher, '--distill', 'attention', '-b', '1000', '--resume', 'auto', '--learning_rate', '1e30')
    args[args.index('--epochs') + 1] = '2'
    proc = run_script('train_student.py', args, tmp_path, check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and 'non-finite' in err[0] and 'epoch 2' in err[0] and 'step' in err[0], proc.stderr
    assert 'term:' in err[0]
    assert (folder / 'resnet8_last.pth').read_bytes() == good


def test_semckd_resume_with_another_batch_size_fails_clearly(workspace, tmp_path):
    _, teacher = workspace
    args = ['--path-t', teacher, '--model_s', 'resnet8', '--distill', 'semckd', '-b', '400', '--epochs', '1',
            '--skip-validation'] + SMALL
    run_script('train_student.py', args, tmp_path)
    folder = tmp_path / 'save' / 'student_model' / 'S:resnet8_T:resnet8_synthetic_semckd_r:1.0_a:1.0_b:400.0_0'
    before = tree_state(folder)
    resumed = args + ['--resume', str(folder / 'resnet8_last.pth')]
    resumed[resumed.index('--batch_size') + 1] = '16'
    proc = run_script('train_student.py', resumed, tmp_path, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert 'batch size of 32' in err[0] and 'uses 16' in err[0]
    assert tree_state(folder) == before
