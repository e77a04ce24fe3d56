import contextlib
import io
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_THREADS = 1

# the shared teacher: resnet8, two epochs on a small synthetic set
TEACHER_DATA = ['--dataset', 'synthetic', '--synthetic_train_size', '256', '--synthetic_val_size', '128',
                '--batch_size', '32', '--num_workers', '0', '--print-freq', '4']
TEACHER_FOLDER = 'resnet8_synthetic_lr_0.05_decay_0.0005_trial_0'


def script_env(**extra):
    """The environment every test runs the repo's scripts in.

    One OpenMP thread: two threads spin-wait for each other when another process holds a
    core. Every run of a test must share it, since the thread count changes the order of
    float reductions, and so the bits of results that tests compare across runs.
    """
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(SCRIPT_THREADS), **extra)


def run_script(script, args, cwd, timeout=600, check=True):
    """Run one of the repo's entry scripts through the real command line."""
    env = script_env()
    target = [script] if script.startswith('-') else [os.path.join(REPO, script)]  # '-m' runs a module
    proc = subprocess.run([sys.executable] + target + [str(a) for a in args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError('{} failed ({}):\n{}\n{}'.format(script, proc.returncode, proc.stdout[-3000:],
                                                              proc.stderr[-3000:]))
    return proc


def run_in_process(main, args, cwd):
    """Run an entry point's ``main(argv)`` in this process and return what it printed.

    The same run as ``run_script`` without an interpreter start and the imports (seconds per
    run): use it wherever the process itself (exit status, stderr, a kill) is not under test.
    It runs with the scripts' thread count, so its results are bit-identical to theirs, and
    leaves this process's global switches as it found them.
    """
    import torch
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    out = io.StringIO()
    torch.set_num_threads(SCRIPT_THREADS)
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out):
            main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    return out.getvalue()


@pytest.fixture
def run():
    return run_script


@pytest.fixture(scope='session')
def teacher_run(tmp_path_factory):
    """One resnet8 teacher run for the whole session: (run folder, its stdout).

    Tests read its files and never write into its folder.
    """
    import train_teacher
    root = tmp_path_factory.mktemp('teacher')
    stdout = run_in_process(train_teacher.main, ['--model', 'resnet8', '--epochs', '2', '--seed', '1',
                                                 '--save_root', root / 'save'] + TEACHER_DATA, root)
    return root / 'save' / 'models' / TEACHER_FOLDER, stdout
