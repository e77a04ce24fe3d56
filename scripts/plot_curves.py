#!/usr/bin/env python
"""Plot the training curves of one or more runs into one PNG.

    python scripts/plot_curves.py save/student_model/S:resnet8x4_T:resnet32x4_cifar100_semckd_* -o semckd.png
    python scripts/plot_curves.py RUN_A RUN_B --labels "KD" "SemCKD" -o kd_vs_semckd.png

Four panels: train and test top-1 accuracy, train and test loss, per epoch, from each run
folder's metrics.jsonl. Each run gets its own colour; the legend names the runs (by default
from their folder names, e.g. "semckd resnet32x4->resnet8x4 #0") with their best test
accuracy, which a dot marks in the test-accuracy panel.
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helper.errors import UserError  # noqa: E402  (plain Python, no torch)

STUDENT_RUN = re.compile(r'^S[:~](?P<s>.+?)_T[:~](?P<t>.+?)_(?P<dataset>[^_]+)_(?P<distill>[^_]+)'
                         r'_r[:~][^_]+_a[:~][^_]+_b[:~](?P<beta>[^_]+)_(?P<trial>.+)$')
VANILLA_RUN = re.compile(r'^(?P<model>.+)_(?P<dataset>[^_]+)_lr_[^_]+_decay_[^_]+_trial_(?P<trial>.+)$')

PANELS = [('train_acc', 'Train top-1 (%)'), ('test_acc', 'Test top-1 (%)'),
          ('train_loss', 'Train loss'), ('test_loss', 'Test loss')]


def run_label(folder):
    """A short name for a run folder: 'semckd resnet32x4->resnet8x4 #0', 'vgg8 alone #1'."""
    name = os.path.basename(os.path.normpath(folder))
    m = STUDENT_RUN.match(name)
    if m:
        return '{} {}->{} #{}'.format(m.group('distill'), m.group('t'), m.group('s'), m.group('trial'))
    m = VANILLA_RUN.match(name)
    if m:
        return '{} alone #{}'.format(m.group('model'), m.group('trial'))
    return name


def read_metrics(folder):
    path = os.path.join(folder, 'metrics.jsonl')
    if not os.path.isfile(path):
        raise UserError("'{}' has no metrics.jsonl; pass run folders made by train_teacher.py or "
                        "train_student.py".format(folder))
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass  # a torn last line of a killed run
    records = [r for r in records if 'epoch' in r]
    if not records:
        raise UserError("'{}' has no epochs logged yet; wait for the first epoch to finish".format(path))
    return sorted(records, key=lambda r: r['epoch'])


def plot(folders, labels, out, title=None):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    runs = [(label, read_metrics(folder)) for folder, label in zip(folders, labels)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    colours = plt.get_cmap('tab10' if len(runs) <= 10 else 'tab20')
    for i, (label, records) in enumerate(runs):
        colour = colours(i % colours.N)
        for ax, (key, _) in zip(axes.flat, PANELS):
            points = [(r['epoch'], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if not points:
                continue
            epochs, values = zip(*points)
            best = max(points, key=lambda p: p[1]) if key == 'test_acc' else None
            ax.plot(epochs, values, color=colour, linewidth=1.4,
                    label='{} (best {:.2f})'.format(label, best[1]) if best else label,
                    marker='o' if len(points) < 20 else None, markersize=3)
            if best:
                ax.plot([best[0]], [best[1]], 'o', color=colour, markersize=7, markeredgecolor='black')
    for ax, (_, name) in zip(axes.flat, PANELS):
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel('epoch')
    handles, names = axes[0][1].get_legend_handles_labels()
    if not handles:
        handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc='lower center', ncol=min(len(names), 3) or 1, frameon=False, fontsize=9)
    if title is None:
        title = 'Training curves: ' + ', '.join(labels)
        if len(title) > 140:
            title = 'Training curves of {} runs: {}, ...'.format(len(labels), ', '.join(labels[:2]))
    fig.suptitle(title, fontsize=11)
    legend_rows = (len(names) + 2) // 3
    fig.tight_layout(rect=(0, 0.03 + 0.03 * legend_rows, 1, 0.95))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', help='run folders (each with a metrics.jsonl)')
    parser.add_argument('-o', '--output', default='curves.png', help='PNG file to write (default: curves.png)')
    parser.add_argument('--labels', nargs='+', default=None, help='one legend label per run (default: from folders)')
    parser.add_argument('--title', default=None, help='figure title (default: names the runs)')
    opt = parser.parse_args(argv)
    if opt.labels is not None and len(opt.labels) != len(opt.runs):
        raise UserError('--labels has {} names for {} runs; give one per run'.format(len(opt.labels), len(opt.runs)))
    for folder in opt.runs:
        if not os.path.isdir(folder):
            raise UserError("'{}' is not a folder; pass run folders such as save/student_model/S:...".format(folder))
    labels = opt.labels or [run_label(f) for f in opt.runs]
    plot(opt.runs, labels, opt.output, opt.title)
    print('wrote ' + opt.output)


if __name__ == '__main__':
    try:
        main()
    except UserError as err:
        print('error: {}'.format(err), file=sys.stderr)
        sys.exit(2)
