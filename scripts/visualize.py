#!/usr/bin/env python
"""The figures distillation papers show, as PNG files, for student runs on the validation set.

    python scripts/visualize.py "save/student_model/S:resnet8x4_T:resnet32x4_cifar100_semckd_r:1.0_a:1.0_b:400.0_0"
    python scripts/visualize.py RUN_A RUN_B --figures tsne corr --out figures/
    python scripts/visualize.py --teacher save/models/resnet32x4_vanilla/ckpt_epoch_240.pth \\
        --student RUN/resnet8x4_best.pth --figures gradcam

Each student (a run folder, or a student checkpoint) is drawn beside its teacher (the run's --path-t,
or --teacher). Figures (--figures, default all that apply), written to OUT/<figure>_<run>.png:

  tsne       t-SNE (scikit-learn) of the penultimate embeddings, teacher and student side by side,
             points coloured by class; --tsne_classes classes and --tsne_per_class images of each.
  corr       |corr(teacher logits) - corr(student logits)|: the class-by-class Pearson correlation of
             the logits over the validation images, as in the CRD and DKD papers; its mean over the
             off-diagonal entries is printed (the diagonal is 0 by construction).
  attention  SemCKD runs only: the weights of the learned (student stage x teacher stage) attention,
             averaged over the validation set, and per class for --attention_classes classes. SemCKD's
             attention reads the batch's similarity matrices, so it runs on batches of the run's
             --batch_size.
  gradcam    Grad-CAM of teacher and student for the true class of --gradcam_images images: the
             class score's gradients, averaged over the last feature map's positions, weight its
             channels. Image, teacher map, student map in a grid.
"""
import argparse
import glob
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import eval as evaluation  # noqa: E402  (scripts/eval.py: checkpoints, data, predictors)
from helper.errors import UserError  # noqa: E402

FIGURES = ('tsne', 'corr', 'attention', 'gradcam')
DPI = 100


# ------------------------------------------------------------------------------------ loading
class Pair:
    """A teacher and a student with what the figures need: names, method, data set, flags."""

    def __init__(self, label, model_t, name_t, model_s, name_s, predictor_s, ckpt_s, dataset, flags, path_s):
        self.label, self.model_t, self.name_t = label, model_t, name_t
        self.predictor_t = evaluation.Predictor(model_t)
        self.model_s, self.name_s, self.predictor_s = model_s, name_s, predictor_s
        self.ckpt_s, self.dataset, self.flags, self.path_s = ckpt_s, dataset, flags, path_s
        self.distill = ckpt_s.get('distill') or flags.get('distill')

    @property
    def method(self):
        from distiller_zoo import DISTILLERS
        cls = DISTILLERS.get(self.distill)
        return (getattr(cls, 'display_name', None) or self.distill) if self.distill else 'no method'

    def title(self):
        return 'teacher {} -> student {} ({}), {} validation set'.format(self.name_t, self.name_s, self.method,
                                                                         self.dataset)


def student_checkpoint(run, which):
    """The student checkpoint of a run folder ({model_s}_{which}.pth), or ``run`` itself if a file."""
    if os.path.isfile(run):
        return run
    if not os.path.isdir(run):
        raise UserError("'{}' is neither a run folder nor a checkpoint".format(run))
    params = evaluation.run_parameters(os.path.join(run, 'parameters.json'))
    name = params.get('model_s') or params.get('model')
    candidates = [os.path.join(run, '{}_{}.pth'.format(name, which))] if name else sorted(
        glob.glob(os.path.join(glob.escape(run), '*_{}.pth'.format(which))))
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
        raise UserError("no *_{}.pth in '{}'; pass a run folder of train_student.py or --student PATH".format(
            which, run))
    return found[0]


def teacher_checkpoint(flags, path_s):
    """The run's --path-t, as given, or relative to the folder that held the run's save root."""
    path_t = flags.get('path_t')
    if not path_t:
        raise UserError("'{}' does not say which teacher it learnt from (no path_t in its run folder's "
                        "parameters.json); pass --teacher PATH".format(path_s))
    run_folder = os.path.dirname(os.path.abspath(path_s))
    # RUN = <save_root>/student_model/<name>; the run started in the folder above <save_root> by default
    bases = [os.getcwd(), os.path.dirname(os.path.dirname(os.path.dirname(run_folder)))]
    save_root = flags.get('save_root')
    if save_root and not os.path.isabs(save_root):
        bases.append(os.path.abspath(os.path.join(os.path.dirname(os.path.dirname(run_folder)),
                                                  os.path.relpath('.', save_root))))
    for base in bases:
        candidate = os.path.join(base, path_t)
        if os.path.isfile(candidate):
            return candidate
    raise UserError("the teacher '{}' of '{}' is not there; pass --teacher PATH".format(path_t, path_s))


def load_pair(student, args, teacher=None):
    path_s = student_checkpoint(student, args.which)
    model_s, ckpt_s, name_s, dataset, params = evaluation.load_network(path_s, args.model_s, args.dataset)
    flags = evaluation.run_flags(ckpt_s, params) or {}
    path_t = teacher or teacher_checkpoint(flags, path_s)
    name_t = args.model_t or (None if teacher else flags.get('model_t'))
    model_t, _, name_t, _, _ = evaluation.load_network(path_t, name_t, dataset)
    predictor_s = evaluation.build_predictor(model_s, ckpt_s, dataset, params, path_s).eval()
    folder = os.path.basename(os.path.dirname(os.path.abspath(path_s)))  # the run folder's name
    label = re.sub(r'[^A-Za-z0-9_.=-]+', '-', folder).strip('-') or 'student'
    return Pair(label, model_t, name_t, model_s, name_s, predictor_s, ckpt_s, dataset, flags, path_s)


# ------------------------------------------------------------------------------------ numbers
def outputs(net, loader, device):
    """(penultimate embeddings, logits, labels) of ``net`` (a model or an eval.Predictor) over ``loader``."""
    feats, logits, labels = [], [], []
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device)
            feat, logit = net(x, is_feat=True)
            feats.append(feat[-1].flatten(1).float().cpu())
            logits.append(logit.float().cpu())
            labels.append(torch.as_tensor(y))
    return torch.cat(feats).numpy(), torch.cat(logits).numpy(), torch.cat(labels).numpy()


def tsne_subset(targets, num_classes, per_class, seed=0):
    """Indices of up to ``per_class`` images of each of ``num_classes`` classes, spread over the labels."""
    targets = np.asarray(targets)
    present = np.unique(targets)
    chosen = present[np.linspace(0, len(present) - 1, min(num_classes, len(present))).round().astype(int)]
    rng = np.random.RandomState(seed)
    picked = []
    for c in np.unique(chosen):
        idx = np.flatnonzero(targets == c)
        picked.extend(sorted(rng.choice(idx, min(per_class, len(idx)), replace=False).tolist()))
    return picked


def embed_tsne(features, seed=0):
    from sklearn.manifold import TSNE
    n = features.shape[0]
    if n < 5:
        raise UserError('t-SNE needs at least 5 images; raise --tsne_per_class or --tsne_classes')
    perplexity = float(min(30.0, (n - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(
        features.astype(np.float64))


def logit_correlation(logits):
    """The classes' Pearson correlation matrix of ``logits`` [images, classes] (constant classes: 0)."""
    x = logits.astype(np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    std = np.sqrt((x ** 2).sum(axis=0))
    z = np.divide(x, std, out=np.zeros_like(x), where=std > 0)
    corr = z.T @ z
    np.fill_diagonal(corr, 1.0)
    return corr


def correlation_difference(logits_t, logits_s):
    """(|corr_t - corr_s|, its mean over the off-diagonal entries)."""
    diff = np.abs(logit_correlation(logits_t) - logit_correlation(logits_s))
    c = diff.shape[0]
    mean = float(diff.sum() / (c * c - c)) if c > 1 else 0.0
    return diff, mean


def semckd_attention(pair, data, device, classes=4):
    """SemCKD's learned attention over ``data``: (mean [n_s, n_t], {class: mean}, images used)."""
    from torch.utils.data import DataLoader
    if pair.distill != 'semckd':
        raise UserError('the attention figure needs a SemCKD run; {} was trained with --distill {}'.format(
            pair.path_s, pair.distill))
    distiller = evaluation.rebuild_distiller(pair.model_s, pair.model_t, pair.ckpt_s, pair.flags, pair.path_s,
                                             pair.dataset).to(device)
    batch = int(pair.flags.get('batch_size') or distiller.batch_size)
    if len(data) < batch:
        raise UserError('the validation set ({} images) is smaller than the batch of {} that the SemCKD '
                        'attention was built for'.format(len(data), batch))
    loader = DataLoader(data, batch_size=batch, shuffle=False, drop_last=True)
    total, per_class, counts, n = None, {}, {}, 0
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device)
            feat_s, _ = pair.model_s(x, is_feat=True)
            feat_t, _ = pair.model_t(x, is_feat=True)
            attention = distiller.self_attention(feat_s[1:-1], feat_t[1:-1])[2].double().cpu()  # [B, n_s, n_t]
            total = attention.sum(0) if total is None else total + attention.sum(0)
            n += attention.shape[0]
            for c in torch.as_tensor(y).unique().tolist():
                mask = torch.as_tensor(y) == c
                per_class[c] = per_class.get(c, 0) + attention[mask].sum(0)
                counts[c] = counts.get(c, 0) + int(mask.sum())
    shown = sorted(per_class)[:classes]
    return (total / n).numpy(), {c: (per_class[c] / counts[c]).numpy() for c in shown}, n


def last_feature_map(feats):
    for f in reversed(feats):
        if f.dim() == 4:
            return f
    raise UserError('the model gives no spatial feature map for Grad-CAM')


def grad_cam(net, x, target):
    """Grad-CAM maps [N, H, W] in [0, 1] at the input's size, and the raw maps at the feature map's.

    The class score's gradient reaches the last feature map through a hook on it; each channel is
    weighted by its gradient averaged over the positions, the weighted sum goes through a ReLU.
    """
    grads = {}
    with torch.enable_grad():
        feats, logits = net(x, is_feat=True)
        fmap = last_feature_map(feats)
        fmap.register_hook(lambda g: grads.__setitem__('fmap', g))
        score = logits.gather(1, target.view(-1, 1)).sum()
        net.zero_grad(set_to_none=True)
        score.backward()
    weights = grads['fmap'].mean(dim=(2, 3), keepdim=True)
    raw = F.relu((weights * fmap.detach()).sum(1))
    up = F.interpolate(raw[:, None], size=x.shape[-2:], mode='bilinear', align_corners=False)[:, 0]
    peak = up.flatten(1).max(1).values.clamp_min(1e-12)
    return (up / peak[:, None, None]).detach(), raw.detach()


# ------------------------------------------------------------------------------------ drawing
def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def plot_tsne(pair, points_t, points_s, labels, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    classes = np.unique(labels)
    cmap = plt.get_cmap('tab10' if len(classes) <= 10 else 'tab20')
    colours = {c: cmap(i % cmap.N) for i, c in enumerate(classes)}
    for ax, points, who, name in ((axes[0], points_t, 'teacher', pair.name_t),
                                  (axes[1], points_s, 'student', pair.name_s)):
        ax.scatter(points[:, 0], points[:, 1], c=[colours[c] for c in labels], s=9, linewidths=0)
        ax.set_title('{} {}'.format(who, name))
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle('t-SNE of penultimate embeddings ({} images of {} classes)\n{}'.format(
        len(labels), len(classes), pair.title()), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_corr(pair, diff, mean, path, vmax=1.0):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(diff, cmap='PuBuGn', vmin=0.0, vmax=vmax, interpolation='nearest')
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, extend='max' if diff.max() > vmax else 'neither')
    ax.set_xlabel('class')
    ax.set_ylabel('class')
    ax.set_title('|corr(teacher logits) - corr(student logits)|, mean {:.4f}\n{}'.format(mean, pair.title()),
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_attention(pair, mean, per_class, n, names, path):
    plt = _plt()
    panels = [('all {} images'.format(n), mean)] + [('class {}'.format(names[c] if names else c), m)
                                                     for c, m in per_class.items()]
    n_s, n_t = mean.shape
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 2.6 * len(panels), 3.6), squeeze=False,
                             constrained_layout=True)
    for ax, (title, matrix) in zip(axes[0], panels):
        ax.imshow(matrix, cmap='viridis', vmin=0.0, vmax=1.0)
        for i in range(n_s):
            for j in range(n_t):
                ax.text(j, i, '{:.2f}'.format(matrix[i, j]), ha='center', va='center', fontsize=8,
                        color='black' if matrix[i, j] > 0.5 else 'white')
        ax.set_xticks(range(n_t), ['T{}'.format(j + 1) for j in range(n_t)])
        ax.set_yticks(range(n_s), ['S{}'.format(i + 1) for i in range(n_s)])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel('teacher stage', fontsize=8)
    axes[0][0].set_ylabel('student stage')
    fig.suptitle('SemCKD attention (student stage x teacher stage)\n' + pair.title(), fontsize=10)
    return _save(fig, path)


def _display(img):
    """A normalised CHW tensor -> HWC in [0, 1] for showing (min-max per image)."""
    img = img.permute(1, 2, 0).numpy().astype(np.float64)
    low, high = img.min(), img.max()
    return (img - low) / (high - low) if high > low else np.zeros_like(img)


def plot_gradcam(pair, images, labels, cams_t, cams_s, names, path):
    plt = _plt()
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(5.4, 1.8 * rows + 0.9), squeeze=False)
    for r in range(rows):
        shown = _display(images[r])
        label = names[labels[r]] if names else str(labels[r])
        for c, (cam, title) in enumerate(((None, 'image: {}'.format(label)),
                                          (cams_t[r], 'teacher {}'.format(pair.name_t)),
                                          (cams_s[r], 'student {}'.format(pair.name_s)))):
            ax = axes[r][c]
            ax.imshow(shown, interpolation='nearest')
            if cam is not None:
                ax.imshow(cam, cmap='jet', alpha=0.5, vmin=0.0, vmax=1.0, interpolation='bilinear')
            ax.set_title(title, fontsize=8)
            ax.axis('off')
    fig.suptitle('Grad-CAM for the true class\n' + pair.title(), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------ main
def parse_option(argv=None):
    from dataset import NUM_CLASSES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='*', metavar='RUN', help='student run folders (or student checkpoints)')
    parser.add_argument('--student', default=None, help='a student checkpoint (with --teacher)')
    parser.add_argument('--teacher', default=None, help="the teacher checkpoint (default: each run's --path-t)")
    parser.add_argument('--model_s', default=None, help='student architecture (default: from its checkpoint)')
    parser.add_argument('--model_t', default=None, help='teacher architecture (default: from the run or checkpoint)')
    parser.add_argument('--figures', nargs='+', choices=FIGURES, default=None,
                        help='which figures (default: all; attention only for SemCKD runs)')
    parser.add_argument('--out', default='figures', help='folder for the PNG files')
    parser.add_argument('--which', default='best', choices=['best', 'last'], help='which checkpoint of a run')
    parser.add_argument('--dataset', default=None, choices=list(NUM_CLASSES), help='default: the run\'s')
    parser.add_argument('--data_folder', default='./data')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--cpu', action='store_true', help='stay on the CPU even when a GPU is there')
    parser.add_argument('--tsne_classes', type=int, default=10)
    parser.add_argument('--tsne_per_class', type=int, default=50)
    parser.add_argument('--corr_vmax', type=float, default=1.0, help='top of the correlation map\'s colour scale')
    parser.add_argument('--attention_classes', type=int, default=4)
    parser.add_argument('--gradcam_images', type=int, default=6)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--synthetic_val_size', type=int, default=None, help=argparse.SUPPRESS)
    opt = parser.parse_args(argv)
    if bool(opt.runs) == bool(opt.student):
        raise UserError('give student run folders, or --student PATH (with --teacher PATH), not both')
    return opt


def draw(pair, opt, device):
    """Every figure asked for of one teacher/student pair; returns {figure: (path, numbers)}."""
    from torch.utils.data import DataLoader, Subset
    data = evaluation.val_dataset(pair.dataset, opt.data_folder, pair.flags, opt.synthetic_val_size)
    names = evaluation.class_names(data)
    targets = getattr(data, 'targets', None)
    if targets is None:
        targets = [data[i][1] for i in range(len(data))]
    wanted = opt.figures or [f for f in FIGURES if f != 'attention' or pair.distill == 'semckd']
    pair.predictor_t.to(device).eval()
    pair.predictor_s.to(device).eval()
    os.makedirs(opt.out, exist_ok=True)
    out = {}

    def path(figure):
        return os.path.join(opt.out, '{}_{}.png'.format(figure, pair.label))

    if 'tsne' in wanted:
        subset = tsne_subset(targets, opt.tsne_classes, opt.tsne_per_class, opt.seed)
        loader = DataLoader(Subset(data, subset), batch_size=opt.batch_size)
        feat_t, _, labels = outputs(pair.predictor_t, loader, device)
        feat_s, _, _ = outputs(pair.predictor_s, loader, device)
        points_t, points_s = embed_tsne(feat_t, opt.seed), embed_tsne(feat_s, opt.seed)
        out['tsne'] = (plot_tsne(pair, points_t, points_s, labels, path('tsne')),
                       {'indices': subset, 'features_t': feat_t, 'features_s': feat_s, 'labels': labels,
                        'points_t': points_t, 'points_s': points_s})
    if 'corr' in wanted:
        loader = DataLoader(data, batch_size=opt.batch_size)
        _, logits_t, _ = outputs(pair.predictor_t, loader, device)
        _, logits_s, _ = outputs(pair.predictor_s, loader, device)
        diff, mean = correlation_difference(logits_t, logits_s)
        print('{}: mean |corr(teacher logits) - corr(student logits)| over classes = {:.4f} ({} images)'.format(
            pair.label, mean, len(data)))
        out['corr'] = (plot_corr(pair, diff, mean, path('corr'), opt.corr_vmax),
                       {'diff': diff, 'mean': mean, 'logits_t': logits_t, 'logits_s': logits_s})
    if 'attention' in wanted:
        mean, per_class, n = semckd_attention(pair, data, device, opt.attention_classes)
        print('{}: SemCKD attention (rows: student stages, columns: teacher stages), mean over {} images:\n{}'
              .format(pair.label, n, np.array2string(mean, precision=3)))
        out['attention'] = (plot_attention(pair, mean, per_class, n, names, path('attention')),
                            {'mean': mean, 'per_class': per_class, 'images': n})
    if 'gradcam' in wanted:
        rng = np.random.RandomState(opt.seed)
        picked = sorted(rng.choice(len(data), min(opt.gradcam_images, len(data)), replace=False).tolist())
        images = torch.stack([data[i][0] for i in picked])
        labels = torch.as_tensor([int(data[i][1]) for i in picked])
        cams_t, _ = grad_cam(pair.predictor_t, images.to(device), labels.to(device))
        cams_s, _ = grad_cam(pair.predictor_s, images.to(device), labels.to(device))
        out['gradcam'] = (plot_gradcam(pair, images, labels.tolist(), cams_t.cpu().numpy(), cams_s.cpu().numpy(),
                                       names, path('gradcam')),
                          {'indices': picked, 'cams_t': cams_t.cpu(), 'cams_s': cams_s.cpu()})
    for figure, (written, _) in out.items():
        print('[{}] {}'.format(figure, written))
    return out


def main(argv=None):
    opt = parse_option(argv)
    device = torch.device('cuda' if torch.cuda.is_available() and not opt.cpu else 'cpu')
    results = {}
    for student in (opt.runs or [opt.student]):
        pair = load_pair(student, opt, opt.teacher)
        results[pair.label] = draw(pair, opt, device)
    return results


if __name__ == '__main__':
    from helper.trainer import run_main
    run_main(main)
