"""Never lose a run: bad input fails in one line, runs resume exactly, files are written atomically."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import train_student
import train_teacher
from conftest import REPO, run_in_process, script_env
from helper.trainer import run_main

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
def workspace(teacher_run, tmp_path_factory):
    """The session's teacher and, in a folder of its own, a finished kd student run to protect."""
    cwd = tmp_path_factory.mktemp('robust')
    teacher = teacher_run[0] / 'resnet8_best.pth'
    run_in_process(train_student.main, student_args(teacher), cwd)
    return cwd, teacher


def student_args(teacher, *extra):
    return ['--path-t', teacher, '--model_s', 'resnet8', '--distill', 'kd', '--epochs', '1',
            '--skip-validation'] + SMALL + list(extra)


def fail_in_process(script, args, cwd, capfd):
    """A run that must fail, through the script's own error handling but in this process:
    (exit status, what reached stderr). Warnings count as stderr, as they would in a process."""
    main = {'train_student.py': train_student.main, 'train_teacher.py': train_teacher.main}[script]
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('default')
        with pytest.raises(SystemExit) as exit_:
            run_in_process(lambda argv: run_main(main, argv), args, cwd)
    err = capfd.readouterr().err
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # Python's defaults
    err += ''.join(str(w.message) + '\n' for w in caught if not issubclass(w.category, hidden))
    return exit_.value.code, err


# the cases run through the real command line: both entry scripts' wiring, and the cases that
# would change this process (CUDA_VISIBLE_DEVICES) or reach the network from it
CLI_CASES = ('missing teacher', 'no cifar, no network', 'missing gpu')


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


def test_bad_input_one_line_nonzero_exit_nothing_touched(workspace, capfd):
    cwd, teacher = workspace
    cases = bad_inputs(cwd, teacher)
    before = tree_state(cwd / 'save')
    # no network for the download case: every connection goes to a closed local port
    env = script_env(http_proxy='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9',
                     HTTP_PROXY='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9')
    messages = {}
    assert set(CLI_CASES) <= {case[0] for case in cases}
    for name, script, args, words in cases:
        if name in CLI_CASES:
            proc = subprocess.run([sys.executable, os.path.join(REPO, script)] + [str(a) for a in args], cwd=cwd,
                                  env=env, capture_output=True, text=True, timeout=300)
            code, stderr = proc.returncode, proc.stderr
        else:
            code, stderr = fail_in_process(script, args, cwd, capfd)
        err = stderr.strip().splitlines()
        assert code not in (0, None), name
        assert len(err) == 1 and err[0].startswith('error: '), (name, stderr)
        for word in words:
            assert word.lower() in err[0].lower(), (name, word, err[0])
        messages[name] = err[0]
        assert tree_state(cwd / 'save') == before, name
    print(json.dumps(messages, indent=1))


# three epochs of four steps; the student runs evaluate their teacher first (the default)
RESUME = ['--dataset', 'synthetic', '--synthetic_train_size', '64', '--synthetic_val_size', '32',
          '--batch_size', '16', '--num_workers', '0', '--print-freq', '1', '--seed', '3', '--epochs', '3']


def kill_when(script, args, cwd, line_start):
    """Run ``script`` in a process of its own and SIGKILL it as soon as it prints a line that
    starts with ``line_start``; asserts that the kill, not the end of the run, stopped it."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, script)] + [str(a) for a in args], cwd=cwd,
                            env=script_env(PYTHONUNBUFFERED='1'), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(line_start):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
    assert seen and seen[-1].startswith(line_start), ''.join(seen[-30:])
    assert proc.returncode == -signal.SIGKILL, ''.join(seen[-30:])


def strip_times(records):
    return [{k: v for k, v in r.items() if not k.endswith('time_s')} for r in records]


def saved_epochs(folder, prefix):
    """(epoch of the resume checkpoint, epochs in metrics.jsonl) of a run folder."""
    last = torch.load(folder / '{}_last.pth'.format(prefix), map_location='cpu', weights_only=False)
    return last['epoch'], [json.loads(line)['epoch'] for line in open(folder / 'metrics.jsonl')]


def assert_same_tensors(a, b, where):
    """Nested dicts/lists of tensors, arrays and numbers, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), '{} differs by up to {:.3g}'.format(where, float((a.double() - b.double()).abs().max()))
    elif isinstance(a, np.ndarray):  # numpy's RNG state
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], '{}.{}'.format(where, k))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, '{}[{}]'.format(where, i))
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize('run', ['kd', 'crd', 'semckd', 'teacher', 'kd-workers'])
def test_killed_and_resumed_run_equals_uninterrupted_run(teacher_run, tmp_path, run):
    """Killed in the middle of epoch 2, resumed; that run killed between epochs 2 and 3, resumed
    again: the end equals the uninterrupted run's bit for bit (weights, optimiser, RNG, metrics)."""
    workers = run.endswith('-workers')
    run = run.replace('-workers', '')
    if run == 'teacher':
        script, main, prefix = 'train_teacher.py', train_teacher.main, 'resnet8'
        args = ['--model', 'resnet8'] + RESUME
        folder = os.path.join('models', 'resnet8_synthetic_lr_0.05_decay_0.0005_trial_0')
    else:
        beta = {'kd': 0, 'crd': 0.8, 'semckd': 400}[run]
        script, main, prefix = 'train_student.py', train_student.main, 'resnet8'
        args = ['--path-t', teacher_run[0] / 'resnet8_best.pth', '--model_s', 'resnet8', '--distill', run,
                '-b', beta, '--nce_k', '16'] + RESUME
        folder = os.path.join('student_model', 'S:resnet8_T:resnet8_synthetic_{}_r:1.0_a:1.0_b:{}_0'.format(
            run, float(beta)))
    if workers:
        args[args.index('--num_workers') + 1] = '2'
    whole, broken = tmp_path / 'whole', tmp_path / 'broken'
    whole.mkdir(), broken.mkdir()
    run_in_process(main, args, whole)
    out = broken / 'save' / folder

    kill_when(script, args, broken, 'Epoch [2][2/4]')
    assert saved_epochs(out, prefix) == (1, [1])
    kill_when(script, args + ['--resume', 'auto'], broken, '==> epoch 3/3')
    assert saved_epochs(out, prefix) == (2, [1, 2])
    run_in_process(main, args + ['--resume', 'auto'], broken)

    a = torch.load(whole / 'save' / folder / '{}_last.pth'.format(prefix), weights_only=False)
    b = torch.load(out / '{}_last.pth'.format(prefix), weights_only=False)
    assert a['epoch'] == b['epoch'] == 3
    for key in ('model', 'distiller', 'optimizer', 'rng', 'best_acc', 'best_epoch', 'scaler', 'data_seed'):
        assert (key in a) == (key in b), key
        if key in a:
            assert_same_tensors(a[key], b[key], key)
    metrics = [strip_times([json.loads(x) for x in open(root / 'save' / folder / 'metrics.jsonl')])
               for root in (whole, broken)]
    assert [m['epoch'] for m in metrics[0]] == [1, 2, 3]
    assert metrics[0] == metrics[1]


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
    # one interpreter imports torch once and forks a fresh writer process for each kill
    code = ('import os, sys, torch; sys.path.insert(0, {!r}); from helper.util import save_checkpoint\n'
            'for request in sys.stdin:\n'
            '    pid = os.fork()\n'
            '    if pid == 0:\n'
            '        i = 0\n'
            '        while True:\n'
            '            i += 1\n'
            '            save_checkpoint({{"w": torch.full((4_000_000,), float(i)), "i": i}}, {!r})\n'
            '            if i == 1:\n'
            '                print("first", os.getpid(), flush=True)\n'
            '    _, status = os.waitpid(pid, 0)\n'
            '    print("gone", os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, flush=True)\n'
            ).format(REPO, str(path))
    server = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=script_env(), text=True)
    seen = []
    try:
        for delay in (0.0, 0.03, 0.07, 0.11, 0.17, 0.23, 0.31, 0.43):
            server.stdin.write('go\n')
            server.stdin.flush()
            word, pid = server.stdout.readline().split()
            assert word == 'first'
            time.sleep(delay)
            os.kill(int(pid), signal.SIGKILL)
            assert server.stdout.readline().split() == ['gone', str(int(signal.SIGKILL))]
            ckpt = torch.load(path, weights_only=False)
            assert torch.all(ckpt['w'] == float(ckpt['i']))
            seen.append(ckpt['i'])
            assert [p.name for p in tmp_path.iterdir() if not p.name.startswith('.')] == ['big.pth']
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    assert max(seen) > 1  # kills did land while later versions were being written


def test_nan_loss_stops_with_epoch_step_and_term_and_keeps_last_checkpoint(workspace, tmp_path, capfd):
    _, teacher = workspace
    run_in_process(train_student.main, student_args(teacher, '--distill', 'attention', '-b', '1000'), tmp_path)
    folder = tmp_path / 'save' / 'student_model' / 'S:resnet8_T:resnet8_synthetic_attention_r:1.0_a:1.0_b:1000.0_0'
    good = (folder / 'resnet8_last.pth').read_bytes()
    args = student_args(teacher, '--distill', 'attention', '-b', '1000', '--resume', 'auto', '--learning_rate', '1e30')
    args[args.index('--epochs') + 1] = '2'
    code, stderr = fail_in_process('train_student.py', args, tmp_path, capfd)
    assert code == 2
    err = stderr.strip().splitlines()
    assert len(err) == 1 and 'non-finite' in err[0] and 'epoch 2' in err[0] and 'step' in err[0], stderr
    assert 'term:' in err[0]
    assert (folder / 'resnet8_last.pth').read_bytes() == good


def test_semckd_resume_with_another_batch_size_fails_clearly(workspace, tmp_path, capfd):
    _, teacher = workspace
    args = ['--path-t', teacher, '--model_s', 'resnet8', '--distill', 'semckd', '-b', '400', '--epochs', '1',
            '--skip-validation'] + SMALL
    run_in_process(train_student.main, args, tmp_path)
    folder = tmp_path / 'save' / 'student_model' / 'S:resnet8_T:resnet8_synthetic_semckd_r:1.0_a:1.0_b:400.0_0'
    before = tree_state(folder)
    resumed = args + ['--resume', str(folder / 'resnet8_last.pth')]
    resumed[resumed.index('--batch_size') + 1] = '16'
    code, stderr = fail_in_process('train_student.py', resumed, tmp_path, capfd)
    err = stderr.strip().splitlines()
    assert code == 2 and len(err) == 1, stderr
    assert 'batch size of 32' in err[0] and 'uses 16' in err[0]
    assert tree_state(folder) == before
