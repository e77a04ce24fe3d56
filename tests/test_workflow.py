"""The research workflow scripts: teacher download, sweeps, results table, curves.

The table test rebuilds the SemCKD paper's own table (tests/paper_table.md) as fabricated run
folders and checks that scripts/summarize.py prints the paper's means, standard deviations
and ARI column back.
"""
import csv
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from distiller_zoo import method_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, 'scripts')
PAPER_TABLE = os.path.join(REPO, 'tests', 'paper_table.md')

# the paper's names -> ours
PAPER_MODELS = {'VGG-8': 'vgg8', 'VGG-13': 'vgg13', 'ShuffleNetV2': 'ShuffleV2', 'MobileNetV2': 'MobileNetV2',
                'WRN-40-2': 'wrn_40_2', 'ResNet-32x4': 'resnet32x4', 'ResNet-8x4': 'resnet8x4'}
PAPER_METHODS = {'KD': 'kd', 'FitNet': 'hint', 'AT': 'attention', 'SP': 'similarity', 'VID': 'vid', 'HKD': 'hkd',
                 'SemCKD': 'semckd'}
# every registered method's reference weights, from its file in distiller_zoo (the one place)
REFERENCE = {m: row['weights'] for m, row in method_table().items()}
REFERENCE_BETA = {m: w['beta'] for m, w in REFERENCE.items()}
PAPER_PAIRS = [('resnet32x4', 'vgg8'), ('resnet32x4', 'vgg13'), ('vgg13', 'ShuffleV2'), ('resnet32x4', 'ShuffleV2'),
               ('wrn_40_2', 'MobileNetV2'), ('vgg13', 'vgg8'), ('resnet32x4', 'resnet8x4')]
LOW_LR = ('MobileNetV2', 'ShuffleV1', 'ShuffleV2')


def parse_markdown_table(text, first_cell):
    """Rows of the first Markdown table whose header starts with first_cell: (header, {label: cells})."""
    lines = [l.strip() for l in text.splitlines()]
    start = next(i for i, l in enumerate(lines) if l.startswith('| ' + first_cell))
    split = lambda l: [c.strip() for c in l.strip('|').split('|')]  # noqa: E731
    header = split(lines[start])
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        cells = split(line)
        rows[cells[0]] = cells[1:]
    return header[1:], rows


def parse_cell(cell):
    """'75.27 ± 0.13' -> (75.27, 0.13); '79.42' -> (79.42, None); '' or '–' or '-' -> None."""
    m = re.match(r'^([\d.]+)(?:\s*±\s*([\d.]+))?$', cell)
    if not m:
        return None
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None)


@functools.lru_cache()
def paper():
    """The paper's table: pairs [(teacher, student)], cells {(row, pair): (mean, std)}, ari {row: value}."""
    with open(PAPER_TABLE) as f:
        header, rows = parse_markdown_table(f.read(), 'Student (teacher)')
    pairs = []
    for h in header[:-1]:
        m = re.match(r'^(.+) \((.+)\)$', h)
        pairs.append((PAPER_MODELS[m.group(2)], PAPER_MODELS[m.group(1)]))
    cells, ari = {}, {}
    for label, values in rows.items():
        for pair, value in zip(pairs, values[:-1]):
            cells[(label, pair)] = parse_cell(value)
        if parse_cell(values[-1]):
            ari[label] = parse_cell(values[-1])[0]
    return pairs, cells, ari


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f)


def fabricate_run(folder, best, params, last=None, epochs=3, finished=True):
    """A run folder as the training scripts leave it: best test top-1 `best`, last-epoch `last`."""
    last = best - 0.5 if last is None else last
    params = dict(params, epochs=epochs)
    if finished:
        params['total_time_s'] = 12.0
    write_json(os.path.join(folder, 'parameters.json'), params)
    write_json(os.path.join(folder, 'test_best_metrics.json'),
               {'test_acc': best, 'test_acc_top5': 90.0, 'test_loss': 1.0, 'epoch': epochs - 1})
    n = epochs if finished else epochs - 1
    with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
        for e in range(1, n + 1):
            acc = best if e == epochs - 1 else (last if e == epochs else best - 5)
            f.write(json.dumps({'epoch': e, 'lr': 0.05, 'train_acc': acc + 10, 'train_acc_top5': 95.0,
                                'train_loss': 3.0 / e, 'test_acc': acc, 'test_acc_top5': 90.0, 'test_loss': 2.0 / e,
                                'best_acc': best, 'epoch_time_s': 1.0, 'data_time_s': 0.1}) + '\n')


def student_folder(root, s, t, distill, beta, trial, gamma=1.0, alpha=1.0):
    return os.path.join(root, 'student_model', 'S:{}_T:{}_cifar100_{}_r:{}_a:{}_b:{}_{}'.format(
        s, t, distill, float(gamma), float(alpha), float(beta), trial))


def vanilla_folder(root, model, trial):
    lr = 0.01 if model in LOW_LR else 0.05
    return os.path.join(root, 'models', '{}_cifar100_lr_{}_decay_{}_trial_{}'.format(model, lr, 5e-4, trial))


def three_trials(mean, std):
    """Three values whose mean is `mean` and whose sample standard deviation is `std`."""
    return [mean - std, mean, mean + std]


@pytest.fixture(scope='module')
def paper_runs(tmp_path_factory):
    """save/ holding the paper's table as runs: 3 trials per cell; HKD through its two passes."""
    root = str(tmp_path_factory.mktemp('paper') / 'save')
    pairs, cells, _ = paper()
    for pair in pairs:
        t, s = pair
        for label, distill in PAPER_METHODS.items():
            mean, std = cells[(label, pair)]
            for trial, acc in enumerate(three_trials(mean, std)):
                if distill != 'hkd':
                    fabricate_run(student_folder(root, s, t, distill, REFERENCE_BETA[distill], trial), acc,
                                  {'model_s': s, 'model_t': t, 'distill': distill, 'dataset': 'cifar100',
                                   'gamma': 1.0, 'alpha': 1.0, 'beta': float(REFERENCE_BETA[distill]),
                                   'trial': str(trial),
                                   'path_t': './save/models/{}_vanilla/ckpt_epoch_240.pth'.format(t)})
                    continue
                # HKD: teacher -> resnet8x4_double (PKT), then resnet8x4_double -> student, as the sweep names it
                aux = student_folder(root, 'resnet8x4_double', t, 'pkt', REFERENCE_BETA['pkt'], trial)
                if not os.path.isdir(aux):
                    fabricate_run(aux, 60.0, {'model_s': 'resnet8x4_double', 'model_t': t, 'distill': 'pkt',
                                              'dataset': 'cifar100', 'gamma': 1.0, 'alpha': 1.0,
                                              'beta': float(REFERENCE_BETA['pkt']),
                                              'trial': str(trial)})
                fabricate_run(student_folder(root, s, 'resnet8x4_double', 'hkd', REFERENCE_BETA['hkd'],
                                             '{}_{}'.format(t, trial)), acc,
                              {'model_s': s, 'model_t': 'resnet8x4_double', 'distill': 'hkd',
                               'dataset': 'cifar100', 'gamma': 1.0, 'alpha': 1.0,
                               'beta': float(REFERENCE_BETA['hkd']),
                               'trial': '{}_{}'.format(t, trial),
                               'path_t': './save/student_model/{}/resnet8x4_double_best.pth'.format(
                                   os.path.basename(aux))})
    # the students trained alone (vgg8 and ShuffleV2 appear in two columns: one set of runs each)
    for pair in pairs:
        s = pair[1]
        mean, std = cells[('Student alone', pair)]
        for trial, acc in enumerate(three_trials(mean, std)):
            folder = vanilla_folder(root, s, trial)
            if not os.path.isdir(folder):
                fabricate_run(folder, acc, {'model': s, 'dataset': 'cifar100', 'trial': str(trial)})
    # a trained resnet32x4 teacher; the others come from --teacher-acc (vgg13 also trained as a student,
    # so its published teacher's accuracy must win over its run folders)
    fabricate_run(vanilla_folder(root, 'resnet32x4', 0), cells[('Teacher', pairs[0])][0],
                  {'model': 'resnet32x4', 'dataset': 'cifar100', 'trial': '0'})
    # noise that must not reach the table: an unfinished run, another data set, the published teachers
    fabricate_run(student_folder(root, 'resnet8x4', 'resnet32x4', 'kd', 0, 7), 10.0,
                  {'model_s': 'resnet8x4', 'model_t': 'resnet32x4', 'distill': 'kd', 'dataset': 'cifar100',
                   'gamma': 1.0, 'alpha': 1.0, 'beta': 0.0, 'trial': '7'}, finished=False)
    fabricate_run(os.path.join(root, 'student_model', 'S:resnet8x4_T:resnet32x4_imagenet_kd_r:1.0_a:1.0_b:0.0_0'),
                  5.0, {'model_s': 'resnet8x4', 'model_t': 'resnet32x4', 'distill': 'kd', 'dataset': 'imagenet',
                        'gamma': 1.0, 'alpha': 1.0, 'beta': 0.0, 'trial': '0'})
    os.makedirs(os.path.join(root, 'models', 'resnet32x4_vanilla'))
    return root


def summarize(root, *args):
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'summarize.py'), '--root', root,
                           '--teacher-acc', 'vgg13=74.64', '--teacher-acc', 'wrn_40_2=75.61'] + list(args),
                          capture_output=True, text=True, timeout=60, cwd='/')
    assert proc.returncode == 0, proc.stderr
    return proc


def test_summary_reproduces_the_paper_table(paper_runs):
    pairs, cells, ari = paper()
    proc = summarize(paper_runs)
    assert '1 unfinished run(s) left out' in proc.stderr
    header, rows = parse_markdown_table(proc.stdout, 'Student (teacher)')
    printed = {ours: theirs for theirs, ours in PAPER_MODELS.items()}
    assert header[:len(pairs)] == ['{} ({})'.format(printed[s], printed[t]) for t, s in pairs]
    assert header[-1] == 'ARI (%)' and len(header) == len(pairs) + 1  # no auxiliary or ImageNet column
    assert list(rows) == ['Student alone', 'KD', 'FitNet', 'AT', 'SP', 'VID', 'HKD', 'SemCKD', 'Teacher']
    for label in rows:
        for j, pair in enumerate(pairs):
            got = parse_cell(rows[label][j])
            want = cells[(label, pair)]
            assert got is not None, (label, pair, rows[label][j])
            assert abs(got[0] - want[0]) <= 0.01, (label, pair, got, want)
            if want[1] is not None:
                assert got[1] is not None and abs(got[1] - want[1]) <= 0.01, (label, pair, got, want)
    for label, value in ari.items():
        printed = float(rows[label][-1])
        assert abs(printed - value) <= 0.3, (label, printed, value)
    assert rows['SemCKD'][-1] == '–'

    # the last-epoch table: every fabricated run's last epoch is 0.5 below its best
    _, last_rows = parse_markdown_table(proc.stdout.split('Last-epoch')[1], 'Student (teacher)')
    for j, pair in enumerate(pairs):
        assert abs(parse_cell(last_rows['SemCKD'][j])[0] - (cells[('SemCKD', pair)][0] - 0.5)) <= 0.01


def test_summary_csv_and_latex(paper_runs):
    pairs, cells, ari = paper()
    rows = list(csv.DictReader(io.StringIO(summarize(paper_runs, '--format', 'csv').stdout)))
    best = {r['method']: r for r in rows if r['table'] == 'best'}
    assert set(best) == {'Student alone', 'KD', 'FitNet', 'AT', 'SP', 'VID', 'HKD', 'SemCKD', 'Teacher'}
    assert {r['table'] for r in rows} == {'best', 'last'}
    for t, s in pairs:
        assert abs(float(best['SemCKD']['{}->{} mean'.format(t, s)]) - cells[('SemCKD', (t, s))][0]) <= 0.01
        assert best['KD']['{}->{} n'.format(t, s)] == '3'
    assert abs(float(best['AT']['ARI']) - ari['AT']) <= 0.3

    tex = summarize(paper_runs, '--format', 'latex', '--metric', 'best').stdout
    assert tex.count(r'\begin{tabular}') == 1 and r'\bottomrule' in tex
    semckd = next(l for l in tex.splitlines() if l.startswith('SemCKD &'))
    assert semckd.startswith(r'SemCKD & 75.27 $\pm$ 0.13 & 79.43 $\pm$ 0.02') and semckd.endswith(r'-- \\')
    assert re.search(r'^Teacher & 79\.42 & 79\.42 & 74\.64 ', tex, re.M)


def test_summary_keeps_weight_settings_apart(tmp_path):
    root = str(tmp_path / 'save')
    base = {'model_s': 'resnet8x4', 'model_t': 'resnet32x4', 'dataset': 'cifar100', 'gamma': 1.0, 'alpha': 1.0}
    fabricate_run(vanilla_folder(root, 'resnet8x4', 0), 70.0, {'model': 'resnet8x4', 'dataset': 'cifar100'})
    fabricate_run(student_folder(root, 'resnet8x4', 'resnet32x4', 'kd', 0, 0), 72.0, dict(base, distill='kd', beta=0.0))
    fabricate_run(student_folder(root, 'resnet8x4', 'resnet32x4', 'semckd', 400, 0), 76.0,
                  dict(base, distill='semckd', beta=400.0))
    fabricate_run(student_folder(root, 'resnet8x4', 'resnet32x4', 'semckd', 200, 0), 73.0,
                  dict(base, distill='semckd', beta=200.0))
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'summarize.py'), '--root', root, '--metric', 'best'],
                         capture_output=True, text=True, timeout=60).stdout
    _, rows = parse_markdown_table(out, 'Student (teacher)')
    assert rows['SemCKD (b=400)'][0] == '76.00' and rows['SemCKD (b=200)'][0] == '73.00'
    assert rows['Teacher'][0] == '-'
    # ARI is taken against the reference weights (b=400): KD (76-72)/(72-70) = 200 %
    assert float(rows['KD'][-1]) == pytest.approx(200.0, abs=0.01)
    assert rows['SemCKD (b=400)'][-1] == '–'
    assert float(rows['SemCKD (b=200)'][-1]) == pytest.approx(100.0, abs=0.01)  # (76-73)/(73-70)

    bad = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'summarize.py'), '--root', str(tmp_path / 'nope')],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and 'is not a folder' in bad.stderr


def test_logit_standardised_runs_have_their_own_folder_and_row(tmp_path):
    import train_student
    teacher = tmp_path / 'resnet8_vanilla' / 'ckpt.pth'
    teacher.parent.mkdir()
    teacher.write_bytes(b'')  # parse_option checks that the file exists, not what it holds
    folders = [train_student.parse_option(['--path-t', str(teacher), '--distill', 'kd', '--save_root', 'r'] + ls)
               .save_folder for ls in ([], ['--logit_stand'])]
    # the run with the switch must not overwrite (or resume) the plain one
    assert folders[1] == folders[0] + '_ls'

    root = str(tmp_path / 'save')
    base = {'model_s': 'resnet8x4', 'model_t': 'resnet32x4', 'dataset': 'cifar100', 'gamma': 1.0, 'alpha': 1.0,
            'beta': 0.0, 'distill': 'kd'}
    fabricate_run(vanilla_folder(root, 'resnet8x4', 0), 70.0, {'model': 'resnet8x4', 'dataset': 'cifar100'})
    fabricate_run(student_folder(root, 'resnet8x4', 'resnet32x4', 'kd', 0, 0), 72.0, dict(base, logit_stand=False))
    fabricate_run(student_folder(root, 'resnet8x4', 'resnet32x4', 'kd', 0, 0) + '_ls', 74.0,
                  dict(base, logit_stand=True))
    # a folder without parameters.json: the suffix alone says it
    folder = student_folder(root, 'resnet8x4', 'resnet32x4', 'kd', 0, 1) + '_ls'
    fabricate_run(folder, 76.0, {'epochs': 3})
    os.remove(os.path.join(folder, 'parameters.json'))
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'summarize.py'), '--root', root, '--metric', 'best'],
                         capture_output=True, text=True, timeout=60).stdout
    _, rows = parse_markdown_table(out, 'Student (teacher)')
    assert rows['KD'][0].startswith('72.00') and rows['KD + LS'][0].startswith('75.00'), rows


def test_plot_curves_writes_a_png(tmp_path):
    from PIL import Image
    a = student_folder(str(tmp_path), 'resnet8x4', 'resnet32x4', 'semckd', 400, 0)
    b = vanilla_folder(str(tmp_path), 'resnet8x4', 0)
    fabricate_run(a, 76.0, {}, epochs=6)
    fabricate_run(b, 72.0, {}, epochs=6)
    out = tmp_path / 'curves.png'
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'plot_curves.py'), a, b, '-o', str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with open(out, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    with Image.open(out) as img:
        img.load()
        assert img.size[0] >= 800 and img.size[1] >= 600
        # not a blank canvas: the curves put many colours on it
        assert len(img.convert('RGB').getcolors(maxcolors=1 << 20)) > 50

    empty = tmp_path / 'empty'
    empty.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'plot_curves.py'), str(empty), '-o', str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and 'no metrics.jsonl' in proc.stderr


# ---------------------------------------------------------------------------- sweeps
def sweep(script, *args, env=None, cwd='/', repo=REPO):
    return subprocess.run(['bash', os.path.join(str(repo), 'scripts', script)] + list(args), capture_output=True,
                          text=True, timeout=60, cwd=cwd,
                          env=dict(os.environ, **dict({'PYTHON': sys.executable}, **(env or {}))))


def student_commands(stdout):
    """The train_student.py commands of a dry run, each as {flag: value}."""
    commands = []
    for line in stdout.splitlines():
        if 'train_student.py' not in line or line.startswith('#'):
            continue
        argv = shlex.split(line)
        flags = {}
        for i, a in enumerate(argv):
            if a.startswith('-') and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
                flags[a] = argv[i + 1]
        commands.append(flags)
    return commands


def test_distill_dry_run_covers_every_method_and_pair():
    proc = sweep('run_cifar_distill.sh', '--trials', '0 1', '--gpus', '0,1', '--dry-run')
    assert proc.returncode == 0, proc.stderr
    commands = student_commands(proc.stdout)
    plain = [c for c in commands if c['--distill'] != 'hkd' and c['--model_s'] != 'resnet8x4_double']
    got = {(c['--distill'], c['--model_t'], c['--model_s'], c['--trial']): c for c in plain}
    assert len(got) == len(plain)  # no run twice
    for method, beta in REFERENCE_BETA.items():
        if method == 'hkd':
            continue
        for t, s in PAPER_PAIRS:
            for trial in '01':
                c = got.pop((method, t, s, trial))
                assert float(c['-b']) == beta
                assert float(c['-r']) == REFERENCE[method]['gamma'] and float(c['-a']) == REFERENCE[method]['alpha']
                assert c['--path-t'] == 'save/models/{}_vanilla/ckpt_epoch_240.pth'.format(t)
    assert not got

    # HKD: one PKT pass into resnet8x4_double per teacher and trial, then HKD from it for each student
    aux = [c for c in commands if c['--model_s'] == 'resnet8x4_double']
    assert sorted((c['--model_t'], c['--trial']) for c in aux) == sorted(
        (t, trial) for t in {'resnet32x4', 'vgg13', 'wrn_40_2'} for trial in '01')
    assert all(c['--distill'] == 'pkt' and float(c['-b']) == REFERENCE_BETA['pkt'] for c in aux)
    hkd = [c for c in commands if c['--distill'] == 'hkd']
    assert len(hkd) == len(PAPER_PAIRS) * 2
    for t, s in PAPER_PAIRS:
        for trial in '01':
            c = next(c for c in hkd if c['--model_s'] == s and c['--trial'] == '{}_{}'.format(t, trial))
            assert float(c['-b']) == REFERENCE_BETA['hkd'] and c['--model_t'] == 'resnet8x4_double'
            assert c['--path-t'] == ('save/student_model/S:resnet8x4_double_T:{}_cifar100_pkt_r:1.0_a:1.0_b:30000.0_'
                                     '{}/resnet8x4_double_best.pth'.format(t, trial))
    # the auxiliary pass comes before the passes that read its checkpoint
    lines = [l for l in proc.stdout.splitlines() if 'train_student.py' in l]
    first_aux = next(i for i, l in enumerate(lines) if '--model_s resnet8x4_double' in l and '--model_t resnet32x4' in l)
    assert all(i > first_aux for i, l in enumerate(lines) if 'T:resnet32x4_cifar100_pkt' in l and '--trial resnet32x4_0' in l)

    one = sweep('run_cifar_distill.sh', '--methods', 'kd semckd', '--pairs', 'resnet32x4:resnet8x4', '--dry-run',
                '--', '--epochs', '2')
    cmds = student_commands(one.stdout)
    assert [(c['--distill'], c['-b'], c['--epochs']) for c in cmds] == [('kd', '0', '2'), ('semckd', '400', '2')]

    bad = sweep('run_cifar_distill.sh', '--methods', 'kd foo', '--dry-run')
    assert bad.returncode == 2 and "unknown method 'foo'" in bad.stderr


def test_vanilla_dry_run():
    proc = sweep('run_cifar_vanilla.sh', '--trials', '0,1', '--models', 'students ResNet50', '--dry-run')
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(l) for l in proc.stdout.splitlines() if 'train_teacher.py' in l]
    runs = sorted((a[a.index('--model') + 1], a[a.index('--trial') + 1]) for a in lines)
    assert runs == sorted((m, t) for m in ['vgg8', 'vgg13', 'ShuffleV2', 'MobileNetV2', 'resnet8x4', 'ResNet50']
                          for t in '01')


@pytest.fixture()
def fake_repo(tmp_path):
    """A copy of scripts/ in a bare repo, so runs and logs stay out of the real save/."""
    repo = tmp_path / 'repo'
    shutil.copytree(SCRIPTS, repo / 'scripts', ignore=shutil.ignore_patterns('__pycache__'))
    for package in ('models', 'helper', 'distiller_zoo', 'crd', 'dataset'):
        os.symlink(os.path.join(REPO, package), repo / package)
    return repo


def test_sweep_runs_jobs_on_each_gpu_skips_and_resumes(fake_repo, tmp_path):
    # a stand-in for python: records its GPU and arguments, fails for SemCKD
    record = tmp_path / 'calls.txt'
    fake = tmp_path / 'fake_python'
    fake.write_text('#!/bin/bash\nif [ "$1" = -c ]; then exec {} "$@"; fi\n'
                    'echo "$CUDA_VISIBLE_DEVICES $*" >> {}\nsleep 0.3\n'
                    'case "$*" in *semckd*) echo boom; exit 1;; esac\n'.format(sys.executable, record))
    fake.chmod(0o755)
    teacher = fake_repo / 'save' / 'models' / 'resnet32x4_vanilla' / 'ckpt_epoch_240.pth'
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b'stand-in')
    # trial 0 of KD finished; trial 0 of AT was interrupted
    fabricate_run(student_folder(str(fake_repo / 'save'), 'resnet8x4', 'resnet32x4', 'kd', 0, 0), 70.0, {})
    at = student_folder(str(fake_repo / 'save'), 'resnet8x4', 'resnet32x4', 'attention', 1000, 0)
    fabricate_run(at, 70.0, {}, finished=False)
    open(os.path.join(at, 'resnet8x4_last.pth'), 'wb').close()

    proc = sweep('run_cifar_distill.sh', '--trials', '0 1', '--gpus', '3,5', '--methods', 'kd attention semckd',
                 '--pairs', 'resnet32x4:resnet8x4', env={'PYTHON': str(fake), 'SWEEP_POLL_S': '0.1'},
                 cwd=str(tmp_path), repo=fake_repo)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the SemCKD jobs failed
    calls = record.read_text().splitlines()
    ran = sorted((c.split()[c.split().index('--distill') + 1], c.split()[c.split().index('--trial') + 1])
                 for c in calls)
    assert ran == [('attention', '0'), ('attention', '1'), ('kd', '1'), ('semckd', '0'), ('semckd', '1')]
    assert {c.split()[0] for c in calls} == {'3', '5'}  # both GPUs used, one CUDA_VISIBLE_DEVICES each
    resumed = [c for c in calls if '--distill attention' in c and '--trial 0' in c]
    assert '--resume auto' in resumed[0]
    assert not any('--resume' in c for c in calls if c is not resumed[0])
    assert proc.stdout.count('[FAIL]') == 2 and 'finished: 3 job(s) ok, 2 failed' in proc.stdout
    log = fake_repo / 'save' / 'logs' / 'S-resnet8x4_T-resnet32x4_cifar100_semckd_r-1.0_a-1.0_b-400.0_1.log'
    assert 'boom' in log.read_text()
    assert str(log.relative_to(fake_repo)) in proc.stdout

    missing = sweep('run_cifar_distill.sh', '--pairs', 'vgg13:vgg8', '--methods', 'kd', env={'PYTHON': str(fake)},
                    repo=fake_repo)
    assert missing.returncode == 2 and 'fetch_pretrained_teachers.sh vgg13' in missing.stderr


# ---------------------------------------------------------------------------- teacher download
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def teacher_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving stand-in teachers."""
    import torch
    sys.path.insert(0, REPO)
    import models
    served = tmp_path / 'served'
    good = models.build_model('resnet56', 100, dataset='cifar100').state_dict()
    for name, content in (('resnet56', 'good'), ('resnet110', 'good'), ('wrn_40_2', 'garbage'),
                          ('resnet32x4', 'good')):
        path = served / '{}_vanilla'.format(name) / 'ckpt_epoch_240.pth'
        path.parent.mkdir(parents=True)
        if content == 'good':  # resnet56's weights: right for resnet56 only
            torch.save({'model': good, 'epoch': 240}, str(path))
        else:
            path.write_bytes(b'<html>not found</html>')
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0),
                                             functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, 'http://127.0.0.1:{}'.format(server.server_address[1])
    server.shutdown()
    server.server_close()


def fetch(repo, *names, env=None, cwd='/'):
    return subprocess.run(['bash', str(repo / 'scripts' / 'fetch_pretrained_teachers.sh')] + list(names),
                          capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=dict(os.environ, PYTHON=sys.executable, **(env or {})))


def test_fetch_teachers(fake_repo, teacher_server, tmp_path):
    """The per-file (repdistiller) layout, chosen by a TEACHERS_URL that is not an archive, as before."""
    import torch
    served, url = teacher_server
    dest = fake_repo / 'save' / 'models'
    # an interrupted earlier download that the server cannot resume (no byte ranges)
    part = dest / 'resnet56_vanilla' / 'ckpt_epoch_240.pth.part'
    part.parent.mkdir(parents=True)
    part.write_bytes((served / 'resnet56_vanilla' / 'ckpt_epoch_240.pth').read_bytes()[:5000])
    # checksums: right for resnet56, wrong for resnet32x4
    sha = hashlib.sha256((served / 'resnet56_vanilla' / 'ckpt_epoch_240.pth').read_bytes()).hexdigest()
    sums = tmp_path / 'sha256.txt'
    sums.write_text('{}  resnet56_vanilla/ckpt_epoch_240.pth\n{}  resnet32x4\n'.format(sha, '0' * 64))

    proc = fetch(fake_repo, 'resnet56', 'resnet110', 'wrn_40_2', 'resnet32x4',
                 env={'TEACHERS_URL': url, 'TEACHERS_SHA256': str(sums)}, cwd=str(tmp_path))
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    good = dest / 'resnet56_vanilla' / 'ckpt_epoch_240.pth'
    assert good.read_bytes() == (served / 'resnet56_vanilla' / 'ckpt_epoch_240.pth').read_bytes()
    assert set(torch.load(str(good), weights_only=True)) >= {'model'}
    assert not part.exists()
    for name in ('resnet110', 'wrn_40_2', 'resnet32x4'):  # rejected and not kept
        assert not list(dest.glob('{}_vanilla/*'.format(name))), name
    assert 'weights do not fit resnet110' in out
    assert 'wrn_40_2' in out and 'not a torch checkpoint' in out
    assert 'does not match the listed ' + '0' * 64 in out
    assert 'could not fetch: resnet110 wrn_40_2 resnet32x4' in out

    mtime = good.stat().st_mtime_ns
    again = fetch(fake_repo, 'resnet56', env={'TEACHERS_URL': url})
    assert again.returncode == 0 and '[skip]' in again.stdout and good.stat().st_mtime_ns == mtime

    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        closed = 'http://127.0.0.1:{}'.format(s.getsockname()[1])
    offline = fetch(fake_repo, 'resnet110', env={'TEACHERS_URL': closed})
    assert offline.returncode == 1
    assert '{}/resnet110_vanilla/ckpt_epoch_240.pth'.format(closed) in offline.stdout
    assert 'cannot connect' in offline.stdout
    assert 'The repdistiller source failed; try --source mdistiller' in offline.stdout
    assert 'TEACHERS_URL' in offline.stdout and not (dest / 'resnet110_vanilla').exists()

    bad = fetch(fake_repo, 'resnet57')
    assert bad.returncode == 2 and "unknown teacher 'resnet57'" in bad.stderr
