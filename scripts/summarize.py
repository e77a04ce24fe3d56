#!/usr/bin/env python
"""Summarise finished runs as the SemCKD paper's CIFAR-100 table.

    python scripts/summarize.py                       # Markdown, from ./save
    python scripts/summarize.py --format latex --teacher-acc resnet32x4=79.42
    python scripts/summarize.py --root /runs/save --format csv > table.csv

Reads every student run under ROOT/student_model/ and every teacher / baseline run under
ROOT/models/, groups the runs by (teacher, student, method) across trials and prints:

* rows: "Student alone" (the student trained alone by train_teacher.py), the methods in the
  paper's order (KD, FitNet, AT, SP, VID, HKD, SemCKD), any other methods in the order of
  ``distiller_zoo`` (CC, RKD, PKT, CRD, IRG, ...), then "Teacher";
* columns: one per teacher/student pair, the paper's pairs first, in its order;
* cells: mean ± standard deviation over trials of the best test top-1 accuracy (the
  ``test_acc`` of ``test_best_metrics.json``); by default the *sample* standard deviation
  (n - 1 in the denominator; a cell of one trial shows the mean alone), ``--std population``
  for n;
* the ARI column, the Average Relative Improvement of SemCKD over each method M, as defined in
  the paper: the mean over the pairs where SemCKD, M and the student alone all have runs of
  (acc_SemCKD - acc_M) / (acc_M - acc_student) * 100, from unrounded means (a pair where M
  equals the student alone exactly is left out: the ratio is undefined there).

A second table does the same with each run's last-epoch test accuracy (the last line of
``metrics.jsonl``). Runs that have not reached their last epoch are left out (and counted on
stderr) unless ``--include-incomplete``.

Runs with different loss weights for one method (say SemCKD with -b 400 and -b 200) are
never pooled: each weight setting gets its own row, labelled with its weights. HKD's second
pass learns from the auxiliary resnet8x4_double; it is filed under the teacher that the
auxiliary learnt from (read from its ``--path-t``), and the auxiliary runs themselves are
hidden unless ``--show-aux``.

The teacher row comes from the teacher's own run folders (train_teacher.py) when there are
any; the published teachers fetched by scripts/fetch_pretrained_teachers.sh carry no metrics,
so give their accuracy with ``--teacher-acc NAME=VALUE`` (which wins over run folders).

Method names, their order and SemCKD's reference weights come from the method files
(``distiller_zoo``, read by ``scripts/methods.py``).
"""
import argparse
import csv
import io
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helper.errors import UserError  # noqa: E402  (plain Python, no torch)
from scripts.methods import read_methods  # noqa: E402

METHODS = read_methods()
# the SemCKD paper's rows, in its order; then every other registered method, in registration order
PAPER_METHODS = ['kd', 'hint', 'attention', 'similarity', 'vid', 'hkd', 'semckd']
OTHER_METHODS = [m for m in METHODS if m not in PAPER_METHODS]
METHOD_NAMES = {m: row['display_name'] for m, row in METHODS.items()}
# (teacher, student), in the column order of the paper's table
PAPER_PAIRS = [('resnet32x4', 'vgg8'), ('resnet32x4', 'vgg13'), ('vgg13', 'ShuffleV2'), ('resnet32x4', 'ShuffleV2'),
               ('wrn_40_2', 'MobileNetV2'), ('vgg13', 'vgg8'), ('resnet32x4', 'resnet8x4')]
# intermediate students that only exist to teach another student (HKD's first pass)
AUX_STUDENTS = ('resnet8x4_double', 'ResNet18Double')
# the SemCKD row ARI compares with, by default: SemCKD at its reference weights
REFERENCE_SEMCKD_WEIGHTS = tuple(float(METHODS['semckd']['weights'][k]) for k in ('gamma', 'alpha', 'beta'))
STUDENT_ROW = 'Student alone'
TEACHER_ROW = 'Teacher'

STUDENT_RUN = re.compile(r'^S[:~](?P<model_s>.+?)_T[:~](?P<model_t>.+?)_(?P<dataset>[^_]+)_(?P<distill>[^_]+)'
                         r'_r[:~](?P<gamma>[^_]+)_a[:~](?P<alpha>[^_]+)_b[:~](?P<beta>[^_]+)_(?P<trial>.+?)'
                         r'(?P<ls>_ls)?(?:_dali[:~](?:cpu|gpu))?$')  # _ls: train_student's LOGIT_STAND_SUFFIX
# a run with logit standardisation is its own row: the method's key with this added
LOGIT_STAND_KEY = '+ls'
VANILLA_RUN = re.compile(r'^(?P<model>.+)_(?P<dataset>[^_]+)_lr_(?P<lr>[^_]+)_decay_(?P<wd>[^_]+)'
                         r'_trial_(?P<trial>.+?)(?:_dali[:~](?:cpu|gpu))?$')


# ---------------------------------------------------------------------------- reading runs
def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_jsonl(path):
    records = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        pass  # a torn last line of a killed run
    except OSError:
        pass
    return records


def read_run(folder):
    """The accuracies of one run folder: dict(best, last, complete, params) or None."""
    params = _read_json(os.path.join(folder, 'parameters.json')) or {}
    best_json = _read_json(os.path.join(folder, 'test_best_metrics.json')) or {}
    records = [r for r in _read_jsonl(os.path.join(folder, 'metrics.jsonl')) if 'test_acc' in r]
    best = best_json.get('test_acc')
    if best is None and records:
        best = max(r['test_acc'] for r in records)
    if best is None:
        return None
    last = records[-1]['test_acc'] if records else None
    complete = True
    if records and isinstance(params.get('epochs'), int):
        complete = records[-1].get('epoch', 0) >= params['epochs']
    return {'best': float(best), 'last': None if last is None else float(last), 'complete': complete,
            'params': params}


def _as_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def real_teacher(root, model_t, path_t, depth=0):
    """The teacher at the root of a chain: a student run used as teacher (HKD's auxiliary)
    is replaced by the teacher it learnt from, read from that run's folder."""
    if not path_t or depth > 5:
        return model_t
    name = os.path.basename(os.path.dirname(os.path.normpath(path_t)))
    match = STUDENT_RUN.match(name)
    if not match:
        return model_t
    # the run may have moved with its save/ folder: look for it under root first
    parent = os.path.join(root, 'student_model', name)
    if not os.path.isdir(parent):
        parent = os.path.dirname(os.path.normpath(path_t))
    parent_params = _read_json(os.path.join(parent, 'parameters.json')) or {}
    return real_teacher(root, parent_params.get('model_t') or match.group('model_t'), parent_params.get('path_t'),
                        depth + 1)


def _subfolders(path):
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(path, d) for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def collect(root, dataset, include_incomplete, show_aux):
    """Read the runs under root. Returns (students, vanilla, notes):
    students: {(distill, gamma, alpha, beta): {(teacher, student): [run, ...]}}
    vanilla: {model: [run, ...]}."""
    students, vanilla, notes = {}, {}, []
    incomplete = 0
    for folder in _subfolders(os.path.join(root, 'student_model')):
        match = STUDENT_RUN.match(os.path.basename(folder))
        run = read_run(folder)
        if run is None or (match is None and 'model_s' not in run['params']):
            continue
        p = run['params']
        get = (lambda k: p[k] if p.get(k) is not None else match.group(k)) if match else p.get
        if get('dataset') != dataset:
            continue
        if get('model_s') in AUX_STUDENTS and not show_aux:
            continue
        if not run['complete'] and not include_incomplete:
            incomplete += 1
            continue
        weights = tuple(_as_float(get(k)) for k in ('gamma', 'alpha', 'beta'))
        teacher = real_teacher(root, get('model_t'), p.get('path_t'))
        logit_stand = p['logit_stand'] if 'logit_stand' in p else bool(match and match.group('ls'))
        distill = get('distill') + (LOGIT_STAND_KEY if logit_stand else '')
        students.setdefault((distill,) + weights, {}).setdefault((teacher, get('model_s')), []).append(run)

    configs = {}
    for folder in _subfolders(os.path.join(root, 'models')):
        match = VANILLA_RUN.match(os.path.basename(folder))
        if match is None:
            continue  # e.g. the published teachers, {name}_vanilla/
        run = read_run(folder)
        if run is None:
            continue
        p = run['params']
        model = p.get('model') or match.group('model')
        if (p.get('dataset') or match.group('dataset')) != dataset:
            continue
        if not run['complete'] and not include_incomplete:
            incomplete += 1
            continue
        vanilla.setdefault(model, []).append(run)
        configs.setdefault(model, set()).add((match.group('lr'), match.group('wd')))
    for model, found in sorted(configs.items()):
        if len(found) > 1:
            notes.append('note: {} has runs with {} learning-rate/weight-decay settings ({}); they are pooled'
                         .format(model, len(found), ', '.join('lr {} wd {}'.format(*c) for c in sorted(found))))
    if incomplete:
        notes.append('note: {} unfinished run(s) left out (--include-incomplete counts them)'.format(incomplete))
    return students, vanilla, notes


# ---------------------------------------------------------------------------- the table
class Cell:
    """Mean and spread of one cell's accuracies (None when it has no runs)."""

    def __init__(self, values, ddof):
        self.values = [v for v in values if v is not None]
        self.n = len(self.values)
        self.mean = float(np.mean(self.values)) if self.values else None
        self.std = float(np.std(self.values, ddof=ddof)) if self.n > ddof else None


def pretty_model(name):
    """Model names as the paper prints them (vgg8 -> VGG-8, wrn_40_2 -> WRN-40-2)."""
    fixed = {'ShuffleV1': 'ShuffleNetV1', 'ShuffleV2': 'ShuffleNetV2', 'MobileNetV2': 'MobileNetV2'}
    if name in fixed:
        return fixed[name]
    m = re.match(r'^resnet(\d+(?:x\d+)?)$', name)
    if m:
        return 'ResNet-' + m.group(1)
    m = re.match(r'^ResNet(\d+)$', name)
    if m:
        return 'ResNet-' + m.group(1)
    m = re.match(r'^vgg(\d+)$', name)
    if m:
        return 'VGG-' + m.group(1)
    m = re.match(r'^wrn_(\d+)_(\d+)$', name)
    if m:
        return 'WRN-{}-{}'.format(m.group(1), m.group(2))
    return name


def _fmt_weight(x):
    return '{:g}'.format(x) if x is not None else '?'


def build_table(students, vanilla, metric, ddof, teacher_acc):
    """The table as plain data: pairs (columns), rows [(label, kind, {pair: Cell}, ari)]."""
    pairs = set()
    for cells in students.values():
        pairs.update(cells)
    pairs = [p for p in PAPER_PAIRS if p in pairs] + sorted(pairs - set(PAPER_PAIRS))

    def runs_cell(runs):
        return Cell([r[metric] for r in runs], ddof)

    order = {m: i for i, m in enumerate(PAPER_METHODS + OTHER_METHODS)}
    keys = sorted(students, key=lambda k: (order.get(_base(k[0]), len(order)), k[0],
                                           [w if w is not None else -1 for w in k[1:]]))
    by_method = {}
    for key in keys:
        by_method.setdefault(key[0], []).append(key)

    def label(key):
        name = METHOD_NAMES.get(_base(key[0]), _base(key[0]))
        if key[0].endswith(LOGIT_STAND_KEY):
            name += ' + LS'
        if len(by_method[key[0]]) == 1:
            return name
        gamma, alpha, beta = key[1:]
        if gamma == 1.0 and alpha == 1.0:
            return '{} (b={})'.format(name, _fmt_weight(beta))
        return '{} (r={}, a={}, b={})'.format(name, _fmt_weight(gamma), _fmt_weight(alpha), _fmt_weight(beta))

    student_row = {p: runs_cell(vanilla.get(p[1], [])) for p in pairs}
    method_rows = [(key, {p: runs_cell(students[key].get(p, [])) for p in pairs}) for key in keys]

    teacher_row = {p: Cell([teacher_acc[p[0]]], ddof) if p[0] in teacher_acc else runs_cell(vanilla.get(p[0], []))
                   for p in pairs}

    # the SemCKD row that ARI compares with: the reference weights if run, else the row with most cells
    semckd = [(key, cells) for key, cells in method_rows if key[0] == 'semckd']
    semckd.sort(key=lambda kc: (kc[0][1:] != REFERENCE_SEMCKD_WEIGHTS,
                                -sum(c.n > 0 for c in kc[1].values())))
    ref = semckd[0] if semckd else None

    rows = [(STUDENT_ROW, 'student', student_row, None)]
    for key, cells in method_rows:
        if ref is None:
            ari = None
        elif key == ref[0]:
            ari = 'ref'
        else:
            ari = average_relative_improvement(ref[1], cells, student_row, pairs)
        rows.append((label(key), 'method', cells, ari))
    rows.append((TEACHER_ROW, 'teacher', teacher_row, None))
    return pairs, rows


def _base(distill):
    """The method of a row's key ('kd+ls' -> 'kd')."""
    return distill[:-len(LOGIT_STAND_KEY)] if distill.endswith(LOGIT_STAND_KEY) else distill


def average_relative_improvement(semckd, method, student, pairs):
    """ARI (%) of SemCKD over a method, from the means of the pairs where all three exist."""
    ratios = []
    for p in pairs:
        s, m, b = semckd[p].mean, method[p].mean, student[p].mean
        if s is None or m is None or b is None or m == b:
            continue
        ratios.append((s - m) / (m - b) * 100.0)
    return float(np.mean(ratios)) if ratios else None


# ---------------------------------------------------------------------------- output
def _cell_text(cell, decimals, pm):
    if cell.mean is None:
        return '-'
    if cell.std is None or cell.n < 2:
        return '{:.{d}f}'.format(cell.mean, d=decimals)
    return '{:.{d}f}{}{:.{d}f}'.format(cell.mean, pm, cell.std, d=decimals)


def _ari_text(ari, decimals, dash):
    if ari == 'ref':
        return dash
    return '' if ari is None else '{:.{d}f}'.format(ari, d=decimals)


def _pair_label(pair, raw):
    t, s = pair
    return '{} ({})'.format(s, t) if raw else '{} ({})'.format(pretty_model(s), pretty_model(t))


def _n_range(rows):
    ns = [c.n for _, kind, cells, _ in rows if kind != 'teacher' for c in cells.values() if c.n]
    if not ns:
        return 'none'
    return str(min(ns)) if min(ns) == max(ns) else '{}-{}'.format(min(ns), max(ns))


def render_markdown(title, pairs, rows, opt):
    out = ['## ' + title, '']
    out.append('| Student (teacher) | ' + ' | '.join(_pair_label(p, opt.raw_names) for p in pairs) + ' | ARI (%) |')
    out.append('|---' * (len(pairs) + 2) + '|')
    for label, _, cells, ari in rows:
        out.append('| {} | {} | {} |'.format(label, ' | '.join(_cell_text(cells[p], opt.decimals, ' ± ')
                                                               for p in pairs), _ari_text(ari, 2, '–')))
    out.append('')
    out.append('Mean ± {} standard deviation over trials ({} trial(s) per cell). ARI: average relative '
               'improvement of SemCKD over each method, mean over pairs of (SemCKD - M) / (M - student) x 100.'
               .format('sample' if opt.std == 'sample' else 'population', _n_range(rows)))
    return '\n'.join(out) + '\n'


def _tex(text):
    for a, b in (('\\', r'\textbackslash{}'), ('&', r'\&'), ('%', r'\%'), ('_', r'\_'), ('#', r'\#')):
        text = text.replace(a, b)
    return text


def render_latex(title, pairs, rows, opt):
    names = (lambda m: m) if opt.raw_names else pretty_model
    out = [r'% needs \usepackage{booktabs} and \usepackage{multirow}', r'\begin{table}[t]', r'\centering', r'\caption{' + _tex(title) + '}',
           r'\begin{tabular}{l' + 'c' * len(pairs) + 'c}', r'\toprule',
           'Student & ' + ' & '.join(_tex(names(s)) for _, s in pairs) + r' & \multirow{2}{*}{ARI (\%)} \\',
           'Teacher & ' + ' & '.join(_tex(names(t)) for t, _ in pairs) + r' & \\', r'\midrule']
    for label, kind, cells, ari in rows:
        if kind == 'teacher':
            out.append(r'\midrule')
        out.append('{} & {} & {} \\\\'.format(_tex(label), ' & '.join(
            _cell_text(cells[p], opt.decimals, r' $\pm$ ') for p in pairs), _ari_text(ari, 2, '--')))
        if kind == 'student':
            out.append(r'\midrule')
    out += [r'\bottomrule', r'\end{tabular}', r'\end{table}']
    return '\n'.join(out) + '\n'


def render_csv(sections, opt):
    """One CSV for all tables: table, method, then mean/std/n per pair ('teacher->student'), ARI."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    pairs = []
    for _, section_pairs, _ in sections:
        pairs += [p for p in section_pairs if p not in pairs]
    header = ['table', 'method']
    for t, s in pairs:
        header += ['{}->{} {}'.format(t, s, k) for k in ('mean', 'std', 'n')]
    writer.writerow(header + ['ARI'])
    for name, section_pairs, rows in sections:
        for label, _, cells, ari in rows:
            line = [name, label]
            for p in pairs:
                c = cells.get(p)
                if c is None or c.mean is None:
                    line += ['', '', 0]
                else:
                    line += ['{:.4f}'.format(c.mean), '' if c.std is None else '{:.4f}'.format(c.std), c.n]
            line.append('' if ari in (None, 'ref') else '{:.4f}'.format(ari))
            writer.writerow(line)
    return buf.getvalue()


# ---------------------------------------------------------------------------- entry point
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--root', default='save', help='folder holding models/ and student_model/ (default: save)')
    parser.add_argument('--format', choices=['markdown', 'csv', 'latex'], default='markdown')
    parser.add_argument('--metric', choices=['best', 'last', 'both'], default='both',
                        help='best test accuracy, last-epoch test accuracy, or both tables (default)')
    parser.add_argument('--dataset', default='cifar100', help='only runs on this data set (default: cifar100)')
    parser.add_argument('--std', choices=['sample', 'population'], default='sample',
                        help='standard deviation over trials with n-1 (sample, default) or n (population)')
    parser.add_argument('--teacher-acc', action='append', default=[], metavar='NAME=VALUE',
                        help='accuracy of teacher NAME (e.g. resnet32x4=79.42); repeatable; wins over run folders')
    parser.add_argument('--include-incomplete', action='store_true', help='count runs that have not finished')
    parser.add_argument('--show-aux', action='store_true', help="show HKD's auxiliary resnet8x4_double runs")
    parser.add_argument('--raw-names', action='store_true', help='model names as in the code (vgg8, not VGG-8)')
    parser.add_argument('--decimals', type=int, default=2, help='decimals of the accuracies (default: 2)')
    opt = parser.parse_args(argv)
    opt.teachers = {}
    for item in opt.teacher_acc:
        name, _, value = item.partition('=')
        try:
            opt.teachers[name.strip()] = float(value)
        except ValueError:
            raise UserError("--teacher-acc takes NAME=VALUE, such as resnet32x4=79.42 (got '{}')".format(item))
        if not name.strip():
            raise UserError("--teacher-acc takes NAME=VALUE, such as resnet32x4=79.42 (got '{}')".format(item))
    if not os.path.isdir(opt.root):
        raise UserError("--root '{}' is not a folder; point it at the save/ folder of your runs".format(opt.root))
    return opt


def main(argv=None):
    opt = parse_args(argv)
    ddof = 1 if opt.std == 'sample' else 0
    students, vanilla, notes = collect(opt.root, opt.dataset, opt.include_incomplete, opt.show_aux)
    for note in notes:
        print(note, file=sys.stderr)
    if not students and not vanilla:
        raise UserError("no finished {} runs under '{}' (looked in models/ and student_model/)"
                        .format(opt.dataset, opt.root))
    metrics = ['best', 'last'] if opt.metric == 'both' else [opt.metric]
    titles = {'best': 'Best test top-1 accuracy (%) on {}'.format(opt.dataset),
              'last': 'Last-epoch test top-1 accuracy (%) on {}'.format(opt.dataset)}
    sections = []
    for metric in metrics:
        pairs, rows = build_table(students, vanilla, metric, ddof, opt.teachers)
        sections.append((metric, pairs, rows))
    if opt.format == 'csv':
        sys.stdout.write(render_csv(sections, opt))
        return
    render = render_markdown if opt.format == 'markdown' else render_latex
    sys.stdout.write('\n'.join(render(titles[m], pairs, rows, opt) for m, pairs, rows in sections))


if __name__ == '__main__':
    try:
        main()
    except UserError as err:
        print('error: {}'.format(err), file=sys.stderr)
        sys.exit(2)
