"""scripts/eval.py, scripts/visualize.py and --wandb on the outputs of a tiny synthetic quick start.

One teacher and one SemCKD student are trained once (1 epoch, a few hundred synthetic images) and
shared by every test; the teacher's run goes through --wandb with a stand-in wandb package that
records what it is given.
"""
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, script_env

DATA = ['--dataset', 'synthetic', '--synthetic_train_size', '128', '--synthetic_val_size', '200',
        '--batch_size', '32', '--num_workers', '0', '--epochs', '1', '--seed', '1']
TEACHER_RUN = 'resnet8_synthetic_lr_0.05_decay_0.0005_trial_0'
STUDENT_RUN = 'S:wrn_16_1_T:resnet8_synthetic_semckd_r:1.0_a:1.0_b:100.0_0'

FAKE_WANDB = '''
import json, os
def _write(event, **kw):
    with open(os.environ['FAKE_WANDB_LOG'], 'a') as f:
        f.write(json.dumps(dict(event=event, **kw), default=str) + '\\n')
_write('import')
class _Run:
    def log(self, values, step=None):
        _write('log', values=values, step=step)
    def finish(self):
        _write('finish')
def init(**kwargs):
    _write('init', **kwargs)
    return _Run()
'''


def load_script(name):
    spec = importlib.util.spec_from_file_location('script_' + name, os.path.join(REPO, 'scripts', name + '.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluation = load_script('eval')
visualize = load_script('visualize')


def train(script, args, cwd, wandb_log):
    env = script_env(FAKE_WANDB_LOG=str(wandb_log))
    env['PYTHONPATH'] = os.pathsep.join([REPO, str(cwd / 'fake_site')])
    proc = subprocess.run([sys.executable, os.path.join(REPO, script)] + [str(a) for a in args], cwd=str(cwd),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope='session')
def runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('quickstart')
    (cwd / 'fake_site' / 'wandb').mkdir(parents=True)
    (cwd / 'fake_site' / 'wandb' / '__init__.py').write_text(FAKE_WANDB)
    teacher = cwd / 'save' / 'models' / TEACHER_RUN
    student = cwd / 'save' / 'student_model' / STUDENT_RUN
    train('train_teacher.py', ['--model', 'resnet8', '--wandb', '--wandb_mode', 'offline'] + DATA, cwd,
          cwd / 'wandb_teacher.jsonl')
    train('train_student.py', ['--path-t', 'save/models/{}/resnet8_best.pth'.format(TEACHER_RUN), '--model_s',
                               'wrn_16_1', '--distill', 'semckd', '-r', '1', '-a', '1', '-b', '100'] + DATA, cwd,
          cwd / 'wandb_student.jsonl')
    return {'cwd': cwd, 'teacher': teacher, 'student': student}


def val_images(n=200):
    from dataset.synthetic import SyntheticImages
    data = SyntheticImages(n, train=False)
    return torch.stack([data[i][0] for i in range(n)]), torch.tensor(data.targets)


def load_model(name, path):
    from models import build_model
    model = build_model(name, 100, dataset='synthetic')
    model.load_state_dict(torch.load(path, map_location='cpu', weights_only=False)['model'])
    return model.eval()


# ----------------------------------------------------------------------------------------- eval.py
def test_eval_reproduces_the_training_metrics_and_counts(runs, capsys):
    for folder, name in ((runs['teacher'], 'resnet8'), (runs['student'], 'wrn_16_1')):
        result = evaluation.main(['--path', str(folder / '{}_best.pth'.format(name)), '--json', '--num_workers',
                                  '0', '--cpu'])
        best = json.loads((folder / 'test_best_metrics.json').read_text())
        assert result['model'] == name and result['dataset'] == 'synthetic' and result['images'] == 200
        assert result['prediction'] == 'model'
        assert result['top1'] == pytest.approx(best['test_acc'], abs=1e-6)
        assert result['top5'] == pytest.approx(best['test_acc_top5'], abs=1e-6)
        assert result['loss'] == pytest.approx(best['test_loss'], rel=1e-5)
        params = json.loads((folder / 'parameters.json').read_text())
        assert result['params'] == round(params['total_params_M'] * 1e6)
        assert result['images_per_s'] > 0
        # FLOPs by hand: 2 * multiply-adds of every convolution and linear layer of one image
        model, expected = load_model(name, folder / '{}_best.pth'.format(name)), [0]

        def count(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
                expected[0] += 2 * output.numel() * k
            elif isinstance(module, nn.Linear):
                expected[0] += 2 * module.in_features * module.out_features
        hooks = [m.register_forward_hook(count) for m in model.modules()]
        with torch.no_grad():
            model(torch.zeros(1, 3, 32, 32))
        for h in hooks:
            h.remove()
        assert result['flops_per_image'] == expected[0]
    printed = json.loads(capsys.readouterr().out.split('\n}\n')[0] + '\n}')
    assert printed['model'] == 'resnet8'


def test_eval_per_class_csv_and_table(runs, tmp_path, capsys):
    path = runs['teacher'] / 'resnet8_best.pth'
    out = tmp_path / 'per_class.csv'
    result = evaluation.main(['--path', str(path), '--per_class', str(out), '--num_workers', '0', '--cpu',
                              '--batch_size', '64'])
    text = capsys.readouterr().out
    assert 'top-1         {:.2f} %'.format(result['top1']) in text and 'FLOPs/image' in text
    rows = list(csv.DictReader(out.open()))
    # ground truth: the network on the validation images, class by class
    x, y = val_images()
    with torch.no_grad():
        logits = load_model('resnet8', path)(x)
    top1 = (logits.argmax(1) == y).numpy()
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).numpy()
    assert [int(r['class']) for r in rows] == sorted(set(y.tolist()))
    for r in rows:
        mask = (y == int(r['class'])).numpy()
        assert int(r['images']) == mask.sum() and r['name'] == 'pattern_{}'.format(r['class'])
        assert float(r['top1']) == pytest.approx(100.0 * top1[mask].mean(), abs=1e-4)
        assert float(r['top5']) == pytest.approx(100.0 * top5[mask].mean(), abs=1e-4)
    assert result['top1'] == pytest.approx(100.0 * top1.mean(), abs=1e-9)


def test_eval_reads_a_converted_checkpoint_by_its_folder_name(runs, tmp_path):
    state = torch.load(runs['teacher'] / 'resnet8_best.pth', map_location='cpu', weights_only=False)['model']
    folder = tmp_path / 'resnet8_vanilla'
    folder.mkdir()
    torch.save({'model': state}, folder / 'converted.pth')   # what model_transform.py writes
    torch.save(state, folder / 'bare.pth')                    # a bare state_dict
    best = json.loads((runs['teacher'] / 'test_best_metrics.json').read_text())
    for name in ('converted.pth', 'bare.pth'):
        result = evaluation.main(['--path', str(folder / name), '--dataset', 'synthetic', '--synthetic_val_size',
                                  '200', '--json', '--num_workers', '0', '--cpu'])
        assert result['model'] == 'resnet8' and result['top1'] == pytest.approx(best['test_acc'], abs=1e-6)


def test_eval_errors_are_one_line(runs, tmp_path, capsys):
    from helper.trainer import run_main
    odd = tmp_path / 'odd_folder'
    odd.mkdir()
    torch.save({'model': {}}, odd / 'x.pth')
    cases = [(['--path', str(tmp_path / 'missing.pth')], 'does not exist'),
             (['--path', str(runs['teacher'] / 'resnet8_best.pth'), '--model', 'resnet20'], 'pass --model'),
             (['--path', str(runs['teacher'] / 'resnet8_best.pth'), '--model', 'resnet9'], "unknown model 'resnet9'"),
             (['--path', str(odd / 'x.pth')], 'pass --model NAME')]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_main(evaluation.main, argv + ['--cpu', '--num_workers', '0'])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err and err.count('\n') == 1, err


@pytest.fixture()
def toy_method():
    """A method that predicts through its own head (a stand-in for one like SimKD); removed after."""
    from distiller_zoo import DISTILLERS
    from distiller_zoo.registry import Distiller

    class ToyPredict(Distiller):
        changes_prediction = True

        def __init__(self, feat_s, feat_t, opt, model_s=None, model_t=None):
            super().__init__(feat_s, feat_t, opt)
            self.head = nn.Linear(feat_s[-1].shape[1], 100)
            self.scale = float(opt.toy_scale)

        def forward(self, feat_s, feat_t, logit_s, logit_t, batch):
            return logit_s.sum() * 0

        def predict(self, feat_s, logit_s):
            return self.scale * self.head(feat_s[-1])

    ToyPredict.name = 'toy_predict'
    DISTILLERS['toy_predict'] = ToyPredict
    try:
        yield ToyPredict
    finally:
        del DISTILLERS['toy_predict']


def test_eval_predicts_through_the_method_when_it_changes_prediction(runs, tmp_path, toy_method, capsys):
    from models import build_model
    student = torch.load(runs['student'] / 'wrn_16_1_best.pth', map_location='cpu', weights_only=False)
    torch.manual_seed(3)
    probe = [torch.zeros(1, 64)]
    head = toy_method(probe, probe, type('O', (), {'toy_scale': 2.0})).state_dict()
    ckpt = {'model': student['model'], 'distiller': head, 'arch': 'wrn_16_1', 'distill': 'toy_predict',
            'teacher': 'resnet8', 'dataset': 'synthetic', 'epoch': 1,
            'opt': {'toy_scale': 2.0, 'batch_size': 32, 'synthetic_val_size': 200}}
    torch.save(ckpt, tmp_path / 'wrn_16_1_best.pth')
    result = evaluation.main(['--path', str(tmp_path / 'wrn_16_1_best.pth'), '--json', '--num_workers', '0',
                              '--cpu', '--synthetic_val_size', '200'])
    assert result['prediction'] == 'method' and result['params_method'] == 64 * 100 + 100
    # ground truth: 2 * (W f + b) on the student's embeddings, by hand
    x, y = val_images()
    net = build_model('wrn_16_1', 100).eval()
    net.load_state_dict(student['model'])
    with torch.no_grad():
        feat = net(x, is_feat=True)[0][-1].numpy().astype(np.float64)
    logits = 2.0 * (feat @ head['head.weight'].numpy().T.astype(np.float64) + head['head.bias'].numpy())
    assert result['top1'] == pytest.approx(100.0 * (logits.argmax(1) == y.numpy()).mean(), abs=1e-9)
    expected_loss = float(F.cross_entropy(torch.tensor(logits), y))
    assert result['loss'] == pytest.approx(expected_loss, rel=1e-4)
    # without the run's flags, the method cannot be rebuilt: one clear line
    del ckpt['opt']
    torch.save(ckpt, tmp_path / 'wrn_16_1_best.pth')
    from helper.errors import UserError
    with pytest.raises(UserError, match='cannot rebuild the --distill toy_predict'):
        evaluation.main(['--path', str(tmp_path / 'wrn_16_1_best.pth'), '--cpu', '--num_workers', '0'])


# ----------------------------------------------------------------------------------------- visualize.py
@pytest.fixture(scope='session')
def figures(runs, tmp_path_factory):
    """Every figure of the student run (t-SNE on 200 points), the figures' titles, and stdout."""
    out = tmp_path_factory.mktemp('figures')
    titles = {}
    save = visualize._save

    def record(fig, path):
        titles[os.path.basename(path).split('_')[0]] = ' '.join(
            [t.get_text() for t in fig.texts] + [ax.get_title() for ax in fig.axes])
        return save(fig, path)

    visualize._save = record
    buf = io.StringIO()
    old_stdout, sys.stdout = sys.stdout, buf
    try:
        # the run's --path-t (save/models/...) is found beside its save root, from any directory
        results = visualize.main([str(runs['student']), '--out', str(out), '--cpu', '--tsne_classes', '100',
                                  '--tsne_per_class', '2', '--gradcam_images', '3', '--attention_classes', '3'])
    finally:
        sys.stdout = old_stdout
        visualize._save = save
    label = STUDENT_RUN.replace(':', '-')
    return results[label], titles, buf.getvalue(), out, label


def png(path):
    from PIL import Image
    image = Image.open(path)
    image.load()
    return image


@pytest.mark.parametrize('figure,size', [('tsne', (1000, 520)), ('corr', (640, 560)),
                                         ('attention', (1160, 360)), ('gradcam', (540, 630))])
def test_each_figure_is_a_titled_png(figures, figure, size):
    results, titles, _, out, label = figures
    path = out / '{}_{}.png'.format(figure, label)
    assert results[figure][0] == str(path)
    image = png(path)
    assert image.format == 'PNG' and image.size == size
    rgb = np.asarray(image.convert('RGB')).reshape(-1, 3).astype(np.uint32)
    assert len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])) > 50  # not one colour, not blank
    for words in ('resnet8', 'wrn_16_1', 'semckd', 'synthetic'):
        assert words in titles[figure].lower(), (figure, titles[figure])


def test_tsne_embeds_the_penultimate_features_of_a_class_subset(figures, runs):
    numbers = figures[0]['tsne'][1]
    x, y = val_images()
    idx = numbers['indices']
    assert len(idx) == 200 and np.array_equal(numbers['labels'], y[idx].numpy())
    assert np.bincount(numbers['labels'], minlength=100).max() <= 2
    for name, folder, key in (('resnet8', runs['teacher'], 'features_t'), ('wrn_16_1', runs['student'],
                                                                          'features_s')):
        with torch.no_grad():
            feat = load_model(name, folder / '{}_best.pth'.format(name))(x[idx], is_feat=True)[0][-1]
        np.testing.assert_allclose(numbers[key], feat.numpy(), rtol=1e-5, atol=1e-5)
    assert numbers['points_t'].shape == (200, 2) and np.isfinite(numbers['points_s']).all()
    small = visualize.tsne_subset([c % 7 for c in range(70)], num_classes=3, per_class=4)
    assert len(small) == 12 and len({c % 7 for c in small}) == 3


def pearson_loops(logits):
    c = logits.shape[1]
    corr = np.eye(c)
    for i in range(c):
        for j in range(i + 1, c):
            a, b = logits[:, i] - logits[:, i].mean(), logits[:, j] - logits[:, j].mean()
            corr[i, j] = corr[j, i] = (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())
    return corr


def test_logit_correlation_difference(figures, runs):
    numbers, stdout = figures[0]['corr'][1], figures[2]
    x, _ = val_images()
    with torch.no_grad():
        logits_t = load_model('resnet8', runs['teacher'] / 'resnet8_best.pth')(x).numpy()
        logits_s = load_model('wrn_16_1', runs['student'] / 'wrn_16_1_best.pth')(x).numpy()
    np.testing.assert_allclose(numbers['logits_t'], logits_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(numbers['logits_s'], logits_s, rtol=1e-5, atol=1e-5)
    block = slice(0, 100, 4)  # the loops on every 4th class keep the test quick
    expected = np.abs(pearson_loops(logits_t[:, block].astype(np.float64)) -
                      pearson_loops(logits_s[:, block].astype(np.float64)))
    np.testing.assert_allclose(numbers['diff'][block, block], expected, atol=1e-6)
    mean = numbers['diff'][~np.eye(100, dtype=bool)].mean()  # the printed mean leaves out the zero diagonal
    assert numbers['mean'] == pytest.approx(mean, abs=1e-12) and np.all(np.diag(numbers['diff']) == 0)
    assert 'over classes = {:.4f}'.format(numbers['mean']) in stdout
    same, zero = visualize.correlation_difference(logits_t, logits_t)
    assert zero == 0.0 and not same.any()


def test_semckd_attention_is_the_selfa_softmax_averaged(figures, runs):
    numbers = figures[0]['attention'][1]
    assert numbers['images'] == 192  # six whole batches of 32 out of 200
    mean = numbers['mean']
    assert mean.shape == (3, 3) and np.allclose(mean.sum(1), 1.0)
    # ground truth: the attention recomputed per sample from its formula with the trained key/query MLPs
    ckpt = torch.load(runs['student'] / 'wrn_16_1_best.pth', map_location='cpu', weights_only=False)
    weights = {k[len('self_attention.'):]: v for k, v in ckpt['distiller'].items()}
    from models.util import MLPEmbed
    mlp = {}
    for key in ('key_weight0', 'key_weight1', 'key_weight2', 'query_weight0', 'query_weight1', 'query_weight2'):
        mlp[key] = MLPEmbed(32, 8)
        mlp[key].load_state_dict({k[len(key) + 1:]: v for k, v in weights.items() if k.startswith(key + '.')})
    teacher = load_model('resnet8', runs['teacher'] / 'resnet8_best.pth')
    student = load_model('wrn_16_1', runs['student'] / 'wrn_16_1_best.pth')
    x, y = val_images()
    rows, labels = [], []
    with torch.no_grad():
        for start in range(0, 192, 32):
            xb = x[start:start + 32]
            fs, ft = student(xb, is_feat=True)[0][1:-1], teacher(xb, is_feat=True)[0][1:-1]
            q = [mlp['query_weight{}'.format(i)](f.reshape(32, -1) @ f.reshape(32, -1).t()) for i, f in enumerate(fs)]
            k = [mlp['key_weight{}'.format(j)](f.reshape(32, -1) @ f.reshape(32, -1).t()) for j, f in enumerate(ft)]
            for b in range(32):
                scores = torch.tensor([[float(q[i][b] @ k[j][b]) for j in range(3)] for i in range(3)])
                rows.append(torch.softmax(scores, dim=1).numpy())
            labels.extend(y[start:start + 32].tolist())
    rows, labels = np.array(rows), np.array(labels)
    np.testing.assert_allclose(mean, rows.mean(0), atol=1e-5)
    assert len(numbers['per_class']) == 3
    for c, per_class in numbers['per_class'].items():
        np.testing.assert_allclose(per_class, rows[labels == c].mean(0), atol=1e-5)


def test_grad_cam_matches_the_class_activation_map(figures, runs):
    numbers = figures[0]['gradcam'][1]
    x, y = val_images()
    idx = numbers['indices']
    assert len(idx) == 3 and numbers['cams_t'].shape == (3, 32, 32)
    for name, folder, key in (('resnet8', runs['teacher'], 'cams_t'), ('wrn_16_1', runs['student'], 'cams_s')):
        model = load_model(name, folder / '{}_best.pth'.format(name))
        with torch.no_grad():
            feats = model(x[idx], is_feat=True)[0]
        fmap, w = feats[-2].double(), model.fc.weight[y[idx]].detach().double()  # [N, C, H, W], [N, C]
        if name == 'wrn_16_1':
            # fc(mean(relu(bn(f)))): the gradient passes BN's scale where the activation is positive
            bn = model.bn1
            scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
            active = (F.batch_norm(fmap, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                                   bn.bias.double(), False, 0.0, bn.eps) > 0).double()
            alpha = (w[:, :, None, None] * scale[None, :, None, None] * active).mean(dim=(2, 3))
        else:
            alpha = w  # GAP then a linear layer: Grad-CAM is the class activation map (CAM)
        cam = F.relu((alpha[:, :, None, None] * fmap).sum(1))
        cam = F.interpolate(cam[:, None], size=(32, 32), mode='bilinear', align_corners=False)[:, 0]
        cam = cam / cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
        np.testing.assert_allclose(numbers[key].numpy(), cam.numpy(), atol=1e-5)


def test_visualize_errors(runs, tmp_path, capsys):
    from helper.trainer import run_main
    teacher_ckpt = str(runs['teacher'] / 'resnet8_best.pth')
    cases = [([], 'give student run folders'),
             ([str(tmp_path / 'nothing')], 'neither a run folder nor a checkpoint'),
             ([str(runs['student']), '--figures', 'attention', '--teacher', teacher_ckpt,
               '--synthetic_val_size', '16'], 'smaller than the batch of 32'),
             (['--student', teacher_ckpt, '--teacher', teacher_ckpt, '--figures', 'attention'],
              'needs a SemCKD run')]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_main(visualize.main, argv + ['--cpu', '--out', str(tmp_path / 'out')])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err and err.count('\n') == 1, err


# ----------------------------------------------------------------------------------------- --wandb
def read_events(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_wandb_gets_the_run_flags_and_every_epoch(runs):
    events = read_events(runs['cwd'] / 'wandb_teacher.jsonl')
    assert [e['event'] for e in events] == ['import', 'init', 'log', 'finish']
    init = events[1]
    folder = runs['teacher']
    assert init['project'] == 'kd-synthetic' and init['name'] == TEACHER_RUN
    assert init['group'] == 'resnet8_synthetic_lr_0.05_decay_0.0005' and init['mode'] == 'offline'
    assert os.path.abspath(os.path.join(str(runs['cwd']), init['dir'])) == str(folder) and init['resume'] == 'allow'
    assert init['id'] == (folder / 'wandb_run_id').read_text()
    assert init['config']['model'] == 'resnet8' and init['config']['wandb'] is True
    assert init['config']['synthetic_train_size'] == 128
    metrics = [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()]
    assert events[2]['step'] == 1
    assert events[2]['values'] == {k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}
    # the student ran without --wandb: the package was never imported
    assert read_events(runs['cwd'] / 'wandb_student.jsonl') == []


def test_wandb_flag_without_the_package(monkeypatch):
    import argparse
    from helper.errors import UserError
    from helper.options import add_common_args, finish_common
    monkeypatch.delitem(sys.modules, 'wandb', raising=False)
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
    opt = add_common_args(argparse.ArgumentParser()).parse_args(['--wandb'])
    with pytest.raises(UserError, match='pip install wandb'):
        finish_common(opt, 'resnet8')


def test_wandb_offline_with_the_real_package(tmp_path, monkeypatch):
    pytest.importorskip('wandb')
    from helper.runlog import RunLog
    monkeypatch.setenv('WANDB_SILENT', 'true')
    folder = tmp_path / 'resnet8_synthetic_lr_0.05_decay_0.0005_trial_0'
    folder.mkdir()
    (folder / 'parameters.json').write_text(json.dumps({'wandb': True, 'wandb_mode': 'offline',
                                                        'dataset': 'synthetic', 'model': 'resnet8'}))
    log = RunLog(str(folder))
    log.log_epoch({'epoch': 1, 'test_acc': 12.5, 'train_loss': 3.0})
    log.close()
    run_id = (folder / 'wandb_run_id').read_text()
    files = list((folder / 'wandb').glob('offline-run-*/run-{}.wandb'.format(run_id)))
    assert len(files) == 1
    # wandb's service process writes the file after finish() returns
    deadline = time.time() + 60
    while b'test_acc' not in files[0].read_bytes() and time.time() < deadline:
        time.sleep(0.2)
    assert b'test_acc' in files[0].read_bytes()
