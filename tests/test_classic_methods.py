"""The adapters of AB, FT, FSP, NST, KDSVD and OFD: formulas, init stages, pair refusals, runs.

The losses themselves are checked in test_classic_losses.py; here each adapter's output is
composed by hand from those tested pieces (feature indices, pre-activation maps, per-layer
weights, margins, connectors), the init stages are checked to train exactly the modules
RepDistiller's helper/pretrain.py trains (everything else unchanged bit for bit, modes as
there), the main stage to start from their result, a resumed run to skip a finished init
stage, and every method runs end to end through train_student's command line.
"""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_student
from distiller_zoo import (ABLoss, FSP, KDSVD, FactorTransfer, NSTLoss, build_distiller, feat_loss,
                           get_margin_from_BN, method_table)
from helper.errors import UserError
from helper.loops import DistillObjective, to_batch, train_step, unwrap
from helper.trainer import run_main, setup_device
from models import model_dict

B = 8
SMALL = ['--dataset', 'synthetic', '--synthetic_train_size', '32', '--synthetic_val_size', '16', '--batch_size', '16',
         '--num_workers', '0', '--skip-validation', '--print-freq', '100']

# scripts/run_cifar_distill.sh of RepDistiller (abound, factor, fsp, nst) and mdistiller's cfg.py (kdsvd, ofd)
REFERENCE_WEIGHTS = {'abound': (1, 0, 1), 'factor': (1, 0, 200), 'fsp': (1, 0, 50), 'nst': (1, 0, 50),
                     'kdsvd': (1, 0, 1), 'ofd': (1, 0, 0.001)}


class Opt:
    init_epochs = 1
    learning_rate = 0.05
    model_s = 'resnet8'


def model(name, seed):
    """A randomly initialised model in eval mode, BN affine parameters randomised so that
    pre-activation maps have both signs and OFD's margins differ per channel."""
    torch.manual_seed(seed)
    net = model_dict[name](num_classes=100).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.normal_(0, 0.5)
    return net


def feats(net, preact, grad=False):
    torch.manual_seed(123)
    x = torch.randn(B, 3, 32, 32)
    with torch.set_grad_enabled(grad):
        return net(x, is_feat=True, preact=preact)[0]


def build(name, model_s, model_t, **opt):
    pre = name in ('abound', 'ofd')
    o = Opt()
    o.__dict__.update(opt)
    fs, ft = feats(model_s, pre), feats(model_t, pre)
    return build_distiller(name, fs, ft, o, model_s=model_s, model_t=model_t), fs, ft


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ facts and formulas

def test_registered_with_reference_weights():
    table = method_table()
    for name, (gamma, alpha, beta) in REFERENCE_WEIGHTS.items():
        assert table[name]['weights'] == {'gamma': gamma, 'alpha': alpha, 'beta': beta}, name
        assert table[name]['source']


def test_ab_init_loss_on_preact_maps_through_the_connector_and_no_main_term():
    s, t = model('wrn_16_1', 1), model('wrn_16_2', 2)
    d, fs, ft = build('abound', s, t)
    assert type(d).preact
    # wrn_16_1 -> wrn_16_2 doubles the channels: one ConvReg (conv + BN, no ReLU) per stage map
    convs = d.connector.connectors
    expected = 0
    for i in range(3):
        g_s = convs[i].bn(convs[i].conv(fs[i + 1]))
        expected = expected + 2 ** (i - 2) * ABLoss(3).criterion_alternative_l2(g_s, ft[i + 1]) / B * 3 / 1000
    close(d.init_loss(fs, ft, None, None, {}), expected)
    assert d(fs, ft, torch.zeros(B, 100), None, {}).item() == 0  # RepDistiller: loss_kd = 0 in the main stage


def test_ft_init_and_main_loss():
    s, t = model('resnet8', 1), model('resnet8x4', 2)
    d, fs, ft = build('factor', s, t)
    f_t = ft[-2]
    close(d.init_loss(fs, ft, None, None, {}), F.mse_loss(d.paraphraser.decoder(d.paraphraser.encoder(f_t)), f_t))
    assert d.paraphraser.encoder[3].out_channels == 128  # k = 0.5 of the teacher's 256 channels
    close(d(fs, ft, None, None, {}), FactorTransfer()(d.translator.encoder(fs[-2]), d.paraphraser.encoder(f_t)))


def test_fsp_init_loss_by_hand_and_no_main_term():
    s, t = model('resnet8', 1), model('resnet20', 2)
    d, fs, ft = build('fsp', s, t)

    def gram(g):  # G[b, c, d] = mean over positions of top[b, c] * bottom[b, d]; equal sizes in a CIFAR ResNet
        out = []
        for bot, top in zip(g[:-1], g[1:]):
            if bot.shape[2] > top.shape[2]:
                bot = F.avg_pool2d(bot, bot.shape[2] // top.shape[2])
            out.append(torch.einsum('bcp,bdp->bcd', top.flatten(2), bot.flatten(2)) / top[0, 0].numel())
        return out

    # feat[:-1]: the stem map and the three stage maps, three consecutive pairs
    expected = sum(((a - b) ** 2).mean() for a, b in zip(gram(fs[:-1]), gram(ft[:-1])))
    close(d.init_loss(fs, ft, None, None, {}), expected)
    assert d(fs, ft, torch.zeros(B, 100), None, {}).item() == 0


def test_nst_and_kdsvd_sum_over_the_three_stage_maps():
    s, t = model('resnet8', 1), model('resnet20', 2)
    d, fs, ft = build('nst', s, t)
    close(d(fs, ft, None, None, {}), sum(NSTLoss()([fs[i]], [ft[i]])[0] for i in (1, 2, 3)))
    d, fs, ft = build('kdsvd', s, t)
    k = KDSVD(1)
    # the loss relates consecutive layers: (1, 2) and (2, 3)
    close(d(fs, ft, torch.zeros(B, 100), None, {}), k(fs[1:3], ft[1:3])[0] + k(fs[2:4], ft[2:4])[0])


@pytest.mark.parametrize('teacher,student', [('resnet8x4', 'resnet8'), ('vgg8', 'resnet8')])
def test_ofd_loss_margins_from_the_teachers_bn_and_layer_weights(teacher, student):
    s, t = model(student, 1), model(teacher, 2)
    d, fs, ft = build('ofd', s, t)
    bns = t.get_bn_before_relu()
    g_t = ft[1:-1]
    n = 3  # vgg8 has four stage maps, resnet8 three: both keep their last three, and the margins of those
    expected = 0
    for k in range(n):
        bn = bns[len(bns) - n + k]
        conv, norm = d.connectors.connectors[k]
        f_s = norm(conv(fs[1 + k]))
        assert conv.kernel_size == (1, 1) and conv.in_channels == fs[1 + k].shape[1]
        f_t = F.adaptive_avg_pool2d(g_t[len(g_t) - n + k], f_s.shape[-2:])
        margin = get_margin_from_BN(bn).reshape(1, -1, 1, 1)
        expected = expected + feat_loss(f_s, f_t, margin) / 2 ** (n - 1 - k)
    close(d(fs, ft, None, None, {}), expected)
    assert not any(k.startswith('margin') for k in d.state_dict())  # the teacher gives them again on resume


def test_ofd_runs_the_teacher_in_train_mode_and_the_others_in_eval_mode():
    s, t = model('resnet8', 1), model('resnet8x4', 2)
    x = torch.randn(B, 3, 32, 32)
    batch = {'target': torch.arange(B)}
    opt = type('O', (), {'kd_T': 4, 'gamma': 1.0, 'alpha': 0.0, 'beta': 1.0})
    for name in ('ofd', 'nst'):
        d, _, _ = build(name, s, t)
        objective = DistillObjective(s, t, d, opt).train()
        assert t.training == (name == 'ofd') and s.training
        objective.train(False)
        assert not t.training
    # the term is computed from the teacher's batch statistics
    objective = DistillObjective(s, t, build('ofd', s, t)[0], opt).train()
    t_train = copy.deepcopy(t).train()
    with torch.no_grad():
        ft = t_train(x, is_feat=True, preact=True)[0]
    s_copy, d_copy = copy.deepcopy(s), copy.deepcopy(objective.distiller)
    expected = d_copy(s_copy(x, is_feat=True, preact=True)[0], ft, None, None, batch)
    _, _, terms = objective(x, batch)
    close(terms['kd'], expected)
    assert t.training and t.layer1[-1].bn2.num_batches_tracked.item() > 0  # as in the references


@pytest.mark.parametrize('name', ['factor', 'nst', 'kdsvd', 'ofd'])
def test_gradients_reach_student_and_adapter_not_teacher_or_paraphraser(name):
    s, t = model('resnet8', 1), model('resnet20', 2)
    t.requires_grad_(False)
    pre = name == 'ofd'
    fs, ft = feats(s, pre, grad=True), feats(t, pre)
    d = build_distiller(name, [f.detach() for f in fs], ft, Opt(), model_s=s, model_t=t)
    d(fs, ft, torch.zeros(B, 100), None, {}).backward()
    assert all(p.grad is not None for p in s.get_feat_modules().parameters())
    for n, p in d.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        assert not n.startswith('paraphraser') or not p.requires_grad
    assert all(p.grad is None for p in t.parameters())


@pytest.mark.parametrize('name,teacher,student,reason', [
    ('fsp', 'wrn_40_2', 'wrn_40_1', 'N/A for wrn_40_2 -> wrn_40_1'),
    ('kdsvd', 'resnet8x4', 'resnet8', 'needs equal channel counts'),
    ('abound', 'vgg8', 'resnet8', 'student has 3 and the teacher 4'),
])
def test_pair_refused_before_training_exit_2_no_run_folder(tmp_path, capsys, name, teacher, student, reason):
    folder = tmp_path / '{}_vanilla'.format(teacher)
    folder.mkdir()
    torch.save({'model': model_dict[teacher](num_classes=100).state_dict()}, folder / 'ckpt.pth')
    with pytest.raises(SystemExit) as e:
        run_main(train_student.main, ['--path-t', str(folder / 'ckpt.pth'), '--model_s', student, '--distill', name,
                                      '--save_root', str(tmp_path / 'save')] + SMALL)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and reason in err, err
    assert not (tmp_path / 'save').exists()


# ------------------------------------------------------------------------------ init stages

@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
    """Random-init teachers saved as {'model': state_dict}, by architecture."""
    root = tmp_path_factory.mktemp('teachers')
    paths = {}
    for i, name in enumerate(('resnet8', 'resnet8x4', 'wrn_16_2')):
        folder = root / '{}_vanilla'.format(name)
        folder.mkdir()
        torch.manual_seed(10 + i)
        torch.save({'model': model_dict[name](num_classes=100).state_dict()}, folder / 'ckpt_epoch_240.pth')
        paths[name] = str(folder / 'ckpt_epoch_240.pth')
    return paths


def trainer_for(teachers, tmp_path, name, teacher, student, *extra):
    opt = train_student.parse_option(['--path-t', teachers[teacher], '--model_s', student, '--distill', name,
                                      '--init_epochs', '1', '--seed', '0', '--save_root', str(tmp_path)]
                                     + SMALL + list(extra))
    opt.distributed, opt.rank, opt.world_size, opt.local_rank = False, 0, 1, 0
    os.makedirs(opt.save_folder)
    return train_student.build_trainer(opt, setup_device(opt))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize('name,teacher,student', [('abound', 'wrn_16_2', 'wrn_16_1'),
                                                  ('factor', 'resnet8x4', 'resnet8'),
                                                  ('fsp', 'resnet8', 'resnet8')])
def test_init_stage_trains_only_its_modules_and_the_main_stage_starts_from_it(teachers, tmp_path, name, teacher,
                                                                              student):
    trainer = trainer_for(teachers, tmp_path, name, teacher, student)
    s, d, t = trainer.modules['model'], trainer.modules['distiller'], trainer.objective.model_t
    if name == 'abound':  # wrn_16_1 -> wrn_16_2: the connector holds a ConvReg per stage map
        stage_modules, only_stage = [d.connector, s.get_feat_modules()], [d.connector]
    elif name == 'factor':
        stage_modules, only_stage = [d.paraphraser], [d.paraphraser]
    else:
        stage_modules, only_stage = [s.get_feat_modules()], []
    stage = nn.ModuleList(stage_modules)
    assert {id(p) for g in trainer.init_optimizer.param_groups for p in g['params']} == set(map(id, stage.parameters()))
    assert trainer.init_optimizer.param_groups[0]['lr'] == (0.01 if name == 'factor' else 0.05)
    # helper/pretrain.py: the student and the teacher in eval mode, only the stage's modules in train mode
    trainer.init_objective.train()
    in_stage = set(map(id, stage.modules()))
    for module in (s, d, t):
        for m in module.modules():
            assert m.training == (id(m) in in_stage), (name, type(m).__name__)

    def stage_keys(module):
        tensors = set(map(id, list(stage.parameters()) + list(stage.buffers())))
        return {k for k, v in list(module.named_parameters()) + list(module.named_buffers()) if id(v) in tensors}

    before = {'s': snapshot(s), 'd': snapshot(d), 't': snapshot(t)}
    trainer._fit_init_stage()
    # the parameters and BN statistics of the stage's modules change; everything else stays bit for bit
    assert changed(before['t'], t) == set()
    assert changed(before['s'], s) == stage_keys(s)
    assert changed(before['d'], d) == stage_keys(d)

    # modules only the stage trains are frozen again, out of the main optimiser (and so of DDP)
    main = {id(p) for g in trainer.optimizer.param_groups for p in g['params']}
    frozen = list(nn.ModuleList(only_stage).parameters())
    assert bool(frozen) == (name != 'fsp')
    assert not any(p.requires_grad or id(p) in main for p in frozen)
    assert main == {id(p) for m in (s, d) for p in m.parameters() if p.requires_grad}

    # the main stage continues from the stage's result: its first loss is computed from the initialised modules
    after = {'s': snapshot(s), 'd': snapshot(d)}
    objective = trainer.objective.train()
    assert s.training and not t.training
    assert not any(m.training for top in only_stage for m in top.modules())  # eval, as in RepDistiller
    trainer.train_sampler.set_epoch(1)
    x, batch = to_batch(next(iter(trainer.train_loader)), torch.device('cpu'))
    student_copy, distiller_copy = copy.deepcopy(s).train(), copy.deepcopy(d).train()
    with torch.no_grad():
        feat_s, logit_s = student_copy(x, is_feat=True, preact=type(d).preact)
        feat_t, _ = t(x, is_feat=True, preact=type(d).preact)
        expected = distiller_copy(feat_s, feat_t, logit_s, None, batch)
    loss, _, terms = train_step(objective, trainer.optimizer, x, batch, trainer.opt, torch.device('cpu'))
    close(terms['kd'], expected)
    close(terms['cls'], F.cross_entropy(logit_s, batch['target']))
    # a main step trains the student and the translator; the connector and the paraphraser stay the stage's result
    assert changed(after['s'], s)
    assert all(k.startswith('translator') for k in changed(after['d'], d))


# ------------------------------------------------------------------------------ end to end and resume

def run(argv, capsys):
    train_student.main(argv)
    return capsys.readouterr().out


def records(folder):
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize('name,teacher', [('abound', 'resnet8x4'), ('factor', 'resnet8x4'), ('fsp', 'resnet8'),
                                          ('nst', 'resnet8x4'), ('kdsvd', 'resnet8'), ('ofd', 'resnet8x4')])
def test_end_to_end_through_the_command_line(teachers, tmp_path, capsys, name, teacher):
    gamma, alpha, beta = REFERENCE_WEIGHTS[name]
    out = run(['--path-t', teachers[teacher], '--model_s', 'resnet8', '--distill', name, '--epochs', '1',
               '--init_epochs', '1', '-r', str(gamma), '-a', str(alpha), '-b', str(beta), '--save_root', str(tmp_path),
               '--dataset', 'synthetic', '--synthetic_train_size', '32', '--synthetic_val_size', '16',
               '--batch_size', '16', '--num_workers', '0'], capsys)
    folder = tmp_path / 'student_model' / 'S:resnet8_T:{}_synthetic_{}_r:{}_a:{}_b:{}_0'.format(
        teacher, name, float(gamma), float(alpha), float(beta))
    assert ('init epoch 1/1' in out) == (name in ('abound', 'factor', 'fsp')), out
    rec = records(folder)
    assert [r['epoch'] for r in rec] == [1]
    assert {'loss_cls', 'loss_kd'} <= set(rec[0]) and 'loss_div' in rec[0]
    assert all(v == v for v in rec[0].values() if isinstance(v, float))  # no NaN
    for f in ('resnet8_last.pth', 'resnet8_best.pth', 'ckpt_epoch_1.pth', 'parameters.json',
              'test_best_metrics.json'):
        assert (folder / f).is_file(), f


class Killed(Exception):
    pass


def test_init_stage_resumes_and_is_skipped_once_done(teachers, tmp_path, capsys, monkeypatch):
    import helper.trainer
    argv = ['--path-t', teachers['resnet8x4'], '--model_s', 'resnet8', '--distill', 'factor', '-a', '0',
            '-b', '200', '--epochs', '2', '--init_epochs', '2', '--save_root', str(tmp_path), '--resume', 'auto',
            '--seed', '1'] + SMALL
    folder = tmp_path / 'student_model' / 'S:resnet8_T:resnet8x4_synthetic_factor_r:1.0_a:0.0_b:200.0_0'
    real = helper.trainer.train_epoch

    def kill_at(call):
        calls = []

        def train_epoch(*args, **kwargs):
            calls.append(1)
            if len(calls) == call:
                raise Killed
            return real(*args, **kwargs)
        monkeypatch.setattr(helper.trainer, 'train_epoch', train_epoch)

    # first run: killed during init epoch 2 (no --resume yet: nothing to resume)
    kill_at(2)
    with pytest.raises(Killed):
        run([a for a in argv if a not in ('--resume', 'auto')], capsys)
    assert '==> init epoch 1/2' in capsys.readouterr().out
    ckpt = torch.load(folder / 'resnet8_last.pth', weights_only=False)
    assert ckpt['epoch'] == 0 and ckpt['init_epoch'] == 1
    # second run: continues with init epoch 2, then killed during main epoch 2
    kill_at(3)
    with pytest.raises(Killed):
        run(argv, capsys)
    out = capsys.readouterr().out
    assert '(init epoch 1/2)' in out and '==> init epoch 2/2' in out and '==> init epoch 1/2' not in out, out
    assert '==> epoch 1/2' in out
    ckpt = torch.load(folder / 'resnet8_last.pth', weights_only=False)
    assert ckpt['epoch'] == 1 and ckpt['init_epoch'] == 2
    paraphraser = {k: v for k, v in ckpt['distiller'].items() if k.startswith('paraphraser')}
    # third run: the finished init stage is not repeated, and the paraphraser stays its result
    monkeypatch.setattr(helper.trainer, 'train_epoch', real)
    out = run(argv, capsys)
    assert 'init epoch' not in out and '(epoch 1, best acc' in out and '==> epoch 2/2' in out, out
    final = torch.load(folder / 'resnet8_last.pth', weights_only=False)
    assert final['epoch'] == 2
    for k, v in paraphraser.items():
        assert torch.equal(final['distiller'][k], v), k
    assert [r['epoch'] for r in records(folder)] == [1, 2]
