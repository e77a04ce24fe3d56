import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_env(**extra):
    """The environment every test runs the repo's scripts in.

    One OpenMP thread: two threads spin-wait for each other when another process holds a
    core. Every run of a test must share it, since the thread count changes the order of
    float reductions, and so the bits of results that tests compare across runs.
    """
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1', **extra)


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


@pytest.fixture
def run():
    return run_script
