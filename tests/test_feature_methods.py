"""ReviewKD, CAT-KD and SimKD as methods: the adapters, the loop, the command line, resume and DDP.

Each adapter's loss is composed here by hand from the already-tested pieces (``hcl_loss``,
``CAT_loss``, ``class_activation_maps``, the ``SimKD`` module) with the per-pair values and
the warm-up written out, and compared with what the adapter returns; gradients must reach the
student and the method's modules, never the teacher or SimKD's frozen classifier. Every method
then runs end to end through ``train_student.main`` in-process; SimKD's validation accuracy is
recomputed by hand from its best checkpoint alone; SimKD and ReviewKD (state beyond the
student) resume bit for bit and keep identical replicas on two gloo processes.

Run as a script under torchrun, this file is the DDP worker of the last test.
"""
import copy
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distiller_zoo import DISTILLERS, build_distiller  # noqa: E402
from distiller_zoo.CATKD import CAT_loss, class_activation_maps  # noqa: E402
from distiller_zoo.ReviewKD import ReviewKD, hcl_loss, review_config  # noqa: E402
from distiller_zoo.SimKD import SimKD  # noqa: E402
from helper.errors import UserError  # noqa: E402
from helper.loops import DistillObjective  # noqa: E402
from models import build_model  # noqa: E402
from models.util import ClassifierMap, PoolInput, get_classifier  # noqa: E402

B = 4


def make_opt(model_t, model_s, **kw):
    opt = dict(model_t=model_t, model_s=model_s, dataset='cifar100', kd_T=4.0, gamma=1.0, alpha=0.0, beta=1.0,
               reviewkd_weight=None, cat_loss_weight=None, cam_resolution=None, cat_normalize=None, simkd_factor=2)
    opt.update(kw)
    return SimpleNamespace(**opt)


def close(a, b, rtol=1e-5, atol=1e-7):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= atol + rtol * (b.abs().max().item() + 1e-12), (err, b.abs().max().item())


def images(seed=0, n=B):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def pair(model_t, model_s, seed=0):
    """A random-init teacher (eval, frozen) and student (train) of the CIFAR zoo."""
    torch.manual_seed(seed)
    t = build_model(model_t, 100, dataset='cifar100').eval().requires_grad_(False)
    s = build_model(model_s, 100, dataset='cifar100').train()
    return t, s


def adapter(name, model_t, model_s, t, s, **kw):
    """The adapter built as build_trainer builds it: from one eval-mode probe pass."""
    method = DISTILLERS[name]
    from distiller_zoo.registry import preact_modes
    preact_s, preact_t = preact_modes(method)
    s.eval()
    with torch.no_grad():
        feat_s, _ = s(images(99, 2), is_feat=True, preact=preact_s)
        feat_t, _ = t(images(99, 2), is_feat=True, preact=preact_t)
    s.train()
    torch.manual_seed(5)
    return build_distiller(name, feat_s, feat_t, make_opt(model_t, model_s, **kw), model_s=s, model_t=t)


# ---------------------------------------------------------------- the preact split

def test_preact_split_defaults_to_preact_and_reviewkd_mixes():
    from distiller_zoo.registry import preact_modes
    assert preact_modes(DISTILLERS['reviewkd']) == (False, True)
    assert preact_modes(DISTILLERS['catkd']) == (False, False) == preact_modes(DISTILLERS['simkd'])
    for name, cls in DISTILLERS.items():
        if cls.preact_s is None and cls.preact_t is None:
            assert preact_modes(cls) == (cls.preact, cls.preact), name


# ---------------------------------------------------------------- ReviewKD

def teacher_levels_by_hand(feat_t_pre):
    return list(feat_t_pre[1:-1]) + [feat_t_pre[-1][:, :, None, None]]


@pytest.mark.parametrize('model_t,model_s,weight', [('resnet56', 'resnet20', 0.6),    # dvlab reviewKD.sh
                                                     ('resnet8x4', 'resnet8', 1.0)])  # no published value
def test_reviewkd_adapter_is_weight_warmup_hcl_on_preact_teacher(model_t, model_s, weight):
    t, s = pair(model_t, model_s)
    d = adapter('reviewkd', model_t, model_s, t, s).train()
    assert sorted({k.split('.')[0] for k in d.state_dict()}) == ['abfs']
    assert d.weight == weight
    opt = make_opt(model_t, model_s)
    objective = DistillObjective(s, t, d, opt).train()
    x, y = images(1), torch.tensor([3, 1, 4, 1])

    # the loop gives the teacher's pre-activation and the student's post-activation features
    feat_s, feat_t, logit_s, _ = objective.features(x)
    with torch.no_grad():
        pre, _ = t(x, is_feat=True, preact=True)
        post_s, _ = s(x, is_feat=True)
    assert all(torch.equal(a, b) for a, b in zip(feat_t, pre))
    assert min(f.min().item() for f in feat_t[1:-1]) < 0
    assert all(torch.equal(a, b) for a, b in zip(feat_s, post_s))

    reference = ReviewKD(**review_config(feat_s, feat_t)).train()
    reference.load_state_dict(d.state_dict())
    for epoch, factor in ((1, 0.05), (7, 0.35), (20, 1.0), (150, 1.0)):  # min(epoch / 20, 1), 1-based
        d.on_epoch_start(epoch)
        loss, logits, terms = objective(x, {'target': y})
        feat_s, feat_t, logit_s, _ = objective.features(x)
        expected = weight * factor * hcl_loss(reference([f.detach() for f in feat_s]), teacher_levels_by_hand(feat_t))
        assert set(terms) == {'cls', 'reviewkd'}  # no KL term (replaces_kd)
        close(terms['reviewkd'], expected)
        close(loss, F.cross_entropy(logit_s, y) + expected)
        close(logits, logit_s)

    loss.backward()
    assert s.conv1.weight.grad.abs().sum() > 0
    for name, p in d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in t.parameters())


def test_reviewkd_weight_flag_overrides_the_pair():
    t, s = pair('resnet56', 'resnet20')
    assert adapter('reviewkd', 'resnet56', 'resnet20', t, s, reviewkd_weight=2.5).weight == 2.5
    with pytest.raises(UserError, match='--reviewkd_weight'):
        adapter('reviewkd', 'resnet56', 'resnet20', t, s, reviewkd_weight=-1.0)


# ---------------------------------------------------------------- CAT-KD

@pytest.mark.parametrize('model_t,model_s,config', [
    ('resnet56', 'resnet20', (0.7, 2, False)),   # configs/cifar100/CAT_KD/res56_res20.yaml: maps from the feat lists
    ('wrn_40_2', 'wrn_40_1', (1.5, 2, False)),   # wrn_40_2_wrn_40_1.yaml: both maps hooked (after the final BN-ReLU)
    ('resnet8x4', 'wrn_16_1', (400.0, 2, True)),  # no published config: the code's defaults
])
def test_catkd_adapter_is_weighted_cat_loss_of_the_pooled_maps(model_t, model_s, config):
    t, s = pair(model_t, model_s)
    weight, resolution, normalize = config
    fc_s = get_classifier(s)
    assert fc_s.bias.abs().sum() > 0 or model_s.startswith('wrn')
    d = adapter('catkd', model_t, model_s, t, s)
    assert (d.weight, d.resolution, d.normalize) == config
    assert not fc_s.bias.requires_grad and torch.count_nonzero(fc_s.bias) == 0
    assert list(d.parameters()) == [] and list(d.state_dict()) == []
    assert d.map_s.from_feats == model_s.startswith('resnet')
    assert d.map_t.from_feats == model_t.startswith('resnet')

    # ground truth maps: what each network's pooling reads, kept by hooks of the test's own
    truth_s, truth_t = PoolInput(s), PoolInput(t)
    objective = DistillObjective(s, t, d, make_opt(model_t, model_s)).train()
    x, y = images(2), torch.tensor([0, 5, 9, 2])
    loss, logits, terms = objective(x, {'target': y})
    cam_s = class_activation_maps(truth_s.feature, fc_s.weight)
    cam_t = class_activation_maps(truth_t.feature, get_classifier(t).weight)
    expected = weight * CAT_loss(cam_s, cam_t, resolution, normalize)
    assert set(terms) == {'cls', 'cat'}
    close(terms['cat'], expected)
    close(loss, F.cross_entropy(logits, y) + expected)

    loss.backward()
    assert fc_s.weight.grad.abs().sum() > 0 and s.conv1.weight.grad.abs().sum() > 0
    assert fc_s.bias.grad is None
    assert all(p.grad is None for p in t.parameters())
    truth_s.remove()
    truth_t.remove()


def test_catkd_flags_override_the_pair_and_are_checked():
    t, s = pair('resnet56', 'resnet20')
    d = adapter('catkd', 'resnet56', 'resnet20', t, s, cat_loss_weight=3.0, cam_resolution=4, cat_normalize=True)
    assert (d.weight, d.resolution, d.normalize) == (3.0, 4, True)
    with pytest.raises(UserError, match='--cam_resolution'):
        adapter('catkd', 'resnet56', 'resnet20', t, s, cam_resolution=0)


def test_classifier_map_refuses_a_stale_map_and_follows_the_feature_dtype():
    t, _ = pair('wrn_16_1', 'resnet8')
    cmap = ClassifierMap(t, 32)
    assert not cmap.from_feats and cmap.shape == (2, 64, 8, 8)
    with torch.no_grad():
        feats, _ = t(images(3), is_feat=True)
    truth = F.relu(t.bn1(feats[-2]))  # WRN pools its last block's output after the final BN-ReLU
    close(cmap(feats), truth)
    with pytest.raises(RuntimeError, match='did not run'):
        cmap(feats)  # the map was consumed; no new pass
    with torch.no_grad():
        feats, _ = t(images(3), is_feat=True)
    assert cmap([f.double() for f in feats]).dtype == torch.float64


# ---------------------------------------------------------------- SimKD

def simkd_prediction_by_hand(proj, cls_t, feat_map, t_H):
    """cls_t(mean_hw(transfer(student map, pooled to the teacher's height if taller)))."""
    if feat_map.shape[2] > t_H:
        feat_map = F.adaptive_avg_pool2d(feat_map, t_H)
    return F.linear(proj.transfer(feat_map).mean(dim=(2, 3)), cls_t.weight, cls_t.bias)


@pytest.mark.parametrize('model_t,model_s', [('resnet8x4', 'resnet8'), ('wrn_16_2', 'resnet8')])
def test_simkd_adapter_loss_prediction_and_frozen_classifier(model_t, model_s):
    t, s = pair(model_t, model_s)
    d = adapter('simkd', model_t, model_s, t, s).train()
    fc_t = get_classifier(t)
    assert d.cls_t is not fc_t and not any(p.requires_grad for p in d.cls_t.parameters())
    assert torch.equal(d.cls_t.weight, fc_t.weight) and torch.equal(d.cls_t.bias, fc_t.bias)
    assert sorted({k.split('.')[0] for k in d.state_dict()}) == ['cls_t', 'proj']
    assert d.map_t.from_feats == (model_t == 'resnet8x4')

    truth_t = PoolInput(t)
    before = copy.deepcopy(d.proj)
    objective = DistillObjective(s, t, d, make_opt(model_t, model_s, gamma=0.0, alpha=0.0)).train()
    x, y = images(4), torch.tensor([1, 2, 3, 4])
    loss, logits, terms = objective(x, {'target': y})
    with torch.no_grad():
        feat_s, _ = s(x, is_feat=True)
    # the loss: MSE of the projected student map and the map the teacher's classifier reads
    trans_s = before.transfer(feat_s[-2])
    close(terms['simkd'], F.mse_loss(trans_s, truth_t.feature))
    close(loss, terms['simkd'])  # -r 0 -a 0: CE and KL are computed, weighted 0
    assert set(terms) == {'cls', 'div', 'simkd'}
    # the training accuracy's logits: the prediction of this same pass; the projector ran once
    close(logits, simkd_prediction_by_hand(before, fc_t, feat_s[-2], 8))
    assert all(int(m.num_batches_tracked) == 1 for m in d.proj.modules() if isinstance(m, torch.nn.BatchNorm2d))

    loss.backward()
    assert s.conv1.weight.grad.abs().sum() > 0
    for name, p in d.proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert d.cls_t.weight.grad is None and d.cls_t.bias.grad is None
    assert all(p.grad is None for p in t.parameters())
    assert get_classifier(s).weight.grad.abs().sum() == 0  # in the graph, weight 0

    # test time: predict needs no teacher
    d.eval()
    s.eval()
    with torch.no_grad():
        feat_s, logit_s = s(x, is_feat=True)
        close(d.predict(feat_s, logit_s), simkd_prediction_by_hand(d.proj, fc_t, feat_s[-2], 8))
    truth_t.remove()


def test_simkd_factor_is_checked():
    t, s = pair('resnet8x4', 'resnet8')
    assert adapter('simkd', 'resnet8x4', 'resnet8', t, s, simkd_factor=4).proj.transfer[0].out_channels == 64
    with pytest.raises(UserError, match='--simkd_factor'):
        adapter('simkd', 'resnet8x4', 'resnet8', t, s, simkd_factor=0)


# ---------------------------------------------------------------- through train_student.main

TINY = ['--dataset', 'synthetic', '--synthetic_train_size', '64', '--synthetic_val_size', '32', '--batch_size', '16',
        '--num_workers', '0', '--print-freq', '2', '--seed', '0']
RUNS = {  # method -> (student, weights): the reference -r / -a / -b
    'reviewkd': ('resnet8', ['-r', '1', '-a', '0', '-b', '1']),
    'catkd': ('wrn_16_1', ['-r', '1', '-a', '0', '-b', '1']),
    'simkd': ('resnet8', ['-r', '0', '-a', '0', '-b', '1']),
}
TERMS = {'reviewkd': {'loss_cls', 'loss_reviewkd'}, 'catkd': {'loss_cls', 'loss_cat'},
         'simkd': {'loss_cls', 'loss_div', 'loss_simkd'}}


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    root = tmp_path_factory.mktemp('feature_methods')
    path = root / 'models' / 'resnet8x4_vanilla' / 'ckpt_epoch_240.pth'
    path.parent.mkdir(parents=True)
    torch.manual_seed(11)
    torch.save({'model': build_model('resnet8x4', 100, dataset='synthetic').state_dict()}, path)
    return root, path


def train(method, root, path, save_root, epochs, *extra):
    import train_student
    model_s, weights = RUNS[method]
    train_student.main(['--path-t', str(path), '--distill', method, '--model_s', model_s, '--epochs', str(epochs),
                        '--save_root', str(save_root)] + weights + TINY + list(extra))
    folders = list((save_root / 'student_model').iterdir())
    assert len(folders) == 1
    return folders[0]


def metrics(folder):
    return [json.loads(line) for line in open(folder / 'metrics.jsonl')]


@pytest.fixture(scope='module')
def full_runs(teacher_file):
    """Each method run uninterrupted for two epochs (SimKD, ReviewKD) or one (CAT-KD)."""
    root, path = teacher_file
    return {method: train(method, root, path, root / ('full_' + method), 1 if method == 'catkd' else 2)
            for method in RUNS}


@pytest.mark.parametrize('method', sorted(RUNS))
def test_every_method_end_to_end(full_runs, method):
    folder = full_runs[method]
    model_s = RUNS[method][0]
    rows = metrics(folder)
    assert [r['epoch'] for r in rows] == list(range(1, len(rows) + 1))
    assert {k for k in rows[0] if k.startswith('loss_')} == TERMS[method]
    assert all(torch.isfinite(torch.tensor(r['train_loss'])) for r in rows)
    for name in (model_s + '_best.pth', model_s + '_last.pth', 'test_best_metrics.json', 'parameters.json'):
        assert (folder / name).is_file(), name
    best = torch.load(folder / (model_s + '_best.pth'), weights_only=False)
    build_model(model_s, 100, dataset='synthetic').load_state_dict(best['model'], strict=True)
    assert best['distill'] == method and 'distiller' in best
    if method == 'catkd':  # the student's classifier stayed bias-free
        assert torch.count_nonzero(best['model']['fc.bias']) == 0


def test_simkd_validation_is_its_prediction_and_the_checkpoint_is_self_contained(teacher_file, full_runs):
    """From the best checkpoint alone (no teacher file), the SimKD prediction's top-1 / top-5 / loss
    on the validation set equal what the run recorded for that epoch."""
    _, path = teacher_file
    folder = full_runs['simkd']
    best = torch.load(folder / 'resnet8_best.pth', weights_only=False)
    recorded = json.loads((folder / 'test_best_metrics.json').read_text())
    assert recorded['epoch'] == best['epoch']

    student = build_model('resnet8', 100, dataset='synthetic').eval()
    student.load_state_dict(best['model'])
    state = best['distiller']
    proj = SimKD(s_n=64, t_n=256, factor=2).eval()
    proj.load_state_dict({k[len('proj.'):]: v for k, v in state.items() if k.startswith('proj.')})
    cls_t = torch.nn.Linear(256, 100)
    cls_t.load_state_dict({k[len('cls_t.'):]: v for k, v in state.items() if k.startswith('cls_t.')})
    assert set(state) == {'proj.' + k for k in proj.state_dict()} | {'cls_t.weight', 'cls_t.bias'}
    # the frozen classifier is the teacher's, untouched by 2 epochs of SGD with weight decay
    teacher_fc = torch.load(path, weights_only=False)['model']
    assert torch.equal(cls_t.weight, teacher_fc['fc.weight']) and torch.equal(cls_t.bias, teacher_fc['fc.bias'])

    from dataset import get_dataloaders
    from helper.loops import to_batch
    import train_student
    opt = train_student.parse_option(['--path-t', str(path), '--model_s', 'resnet8'] + TINY)
    opt.distributed, opt.world_size, opt.rank = False, 1, 0
    _, val_loader, _, _ = get_dataloaders(opt)
    hit1 = hit5 = n = 0
    loss_sum = own_loss_sum = 0.0
    with torch.no_grad():
        for data in val_loader:
            x, batch = to_batch(data, torch.device('cpu'))
            y = batch['target']
            feat_s, logit_s = student(x, is_feat=True)
            logits = simkd_prediction_by_hand(proj, cls_t, feat_s[-2], 8)
            top5 = logits.topk(5, dim=1).indices
            hit1 += (top5[:, 0] == y).sum().item()
            hit5 += (top5 == y[:, None]).any(dim=1).sum().item()
            loss_sum += F.cross_entropy(logits, y, reduction='sum').item()
            own_loss_sum += F.cross_entropy(logit_s, y, reduction='sum').item()
            n += y.numel()
    assert n == 32
    assert recorded['test_acc'] == pytest.approx(100.0 * hit1 / n, abs=1e-9)
    assert recorded['test_acc_top5'] == pytest.approx(100.0 * hit5 / n, abs=1e-9)
    assert recorded['test_loss'] == pytest.approx(loss_sum / n, rel=1e-5)
    assert abs(own_loss_sum - loss_sum) / n > 1e-3  # not the student's own logits


def test_optimiser_holds_only_trainable_parameters(teacher_file, tmp_path):
    """SimKD's frozen classifier and CAT-KD's dropped bias never reach SGD (weight decay would move them)."""
    import train_student
    from helper.trainer import setup_device
    _, path = teacher_file
    for method, frozen in (('simkd', lambda tr: list(tr.modules['distiller'].cls_t.parameters())),
                           ('catkd', lambda tr: [tr.modules['model'].fc.bias])):
        model_s, weights = RUNS[method]
        opt = train_student.parse_option(['--path-t', str(path), '--distill', method, '--model_s', model_s,
                                          '--save_root', str(tmp_path)] + weights + TINY)
        opt.distributed, opt.world_size, opt.rank, opt.local_rank = False, 1, 0, 0
        trainer = train_student.build_trainer(opt, setup_device(opt))
        in_sgd = {id(p) for g in trainer.optimizer.param_groups for p in g['params']}
        assert all(p.requires_grad for g in trainer.optimizer.param_groups for p in g['params'])
        assert not any(id(p) in in_sgd for p in frozen(trainer))
        assert all(id(p) in in_sgd for p in trainer.modules['model'].parameters() if p.requires_grad)


@pytest.mark.parametrize('method', ['simkd', 'reviewkd'])
def test_resume_equals_an_uninterrupted_run(teacher_file, full_runs, method, tmp_path):
    root, path = teacher_file
    model_s = RUNS[method][0]
    first = train(method, root, path, tmp_path, 1)
    train(method, root, path, tmp_path, 2, '--resume', str(first / (model_s + '_last.pth')))
    a = torch.load(full_runs[method] / (model_s + '_last.pth'), weights_only=False)
    b = torch.load(first / (model_s + '_last.pth'), weights_only=False)
    assert a['epoch'] == b['epoch'] == 2
    for key in ('model', 'distiller'):
        assert list(a[key]) == list(b[key])
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    state_a, state_b = a['optimizer']['state'], b['optimizer']['state']
    assert sorted(state_a) == sorted(state_b)
    assert all(torch.equal(state_a[i]['momentum_buffer'], state_b[i]['momentum_buffer']) for i in state_a)
    ra, rb = metrics(full_runs[method])[1], metrics(first)[1]
    for key in ('train_loss', 'train_acc', 'test_acc', 'test_loss') + tuple(TERMS[method]):
        assert ra[key] == rb[key], key


# ---------------------------------------------------------------- 2-process DDP

def test_two_gloo_processes_keep_identical_replicas(teacher_file, tmp_path):
    """SimKD and ReviewKD, two steps each on two processes: every parameter of student and
    method identical on both (SimKD's frozen classifier too); SimKD's projector statistics are
    rank 0's at validation, and its reduced validation equals one process's."""
    from conftest import REPO, run_script
    root, path = teacher_file
    run_script('-m', ['torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29571',
                      os.path.join(REPO, 'tests', 'test_feature_methods.py'), tmp_path, path], root)
    for method in ('simkd', 'reviewkd'):
        result = torch.load(tmp_path / (method + '.pth'), weights_only=False)
        (pa, ba), (pb, bb) = result['replicas']
        assert pa.numel() > 50_000 and torch.equal(pa, pb)
        if method == 'simkd':  # student and projector statistics: rank 0's on both after validation
            assert torch.equal(ba, bb)
            state = result['distiller']
            assert torch.equal(state['cls_t.weight'], torch.load(path, weights_only=False)['model']['fc.weight'])
            single = _validate_single(result, path)
            acc1, acc5, loss = result['acc']
            assert (acc1, acc5) == pytest.approx(single[:2], abs=1e-9)
            assert loss == pytest.approx(single[2], rel=1e-5)


def _validate_single(result, path):
    import train_student
    from dataset import get_dataloaders
    from distiller_zoo import StudentPredictor
    from helper.loops import validate
    opt = train_student.parse_option(['--path-t', str(path), '--distill', 'simkd', '--model_s', 'resnet8']
                                     + RUNS['simkd'][1] + TINY)
    opt.distributed, opt.world_size, opt.rank = False, 1, 0
    _, val_loader, _, _ = get_dataloaders(opt)
    student = build_model('resnet8', 100, dataset='synthetic')
    student.load_state_dict(result['student'])
    t, _ = pair('resnet8x4', 'resnet8')
    d = adapter('simkd', 'resnet8x4', 'resnet8', t, student)
    d.load_state_dict(result['distiller'])
    return validate(val_loader, StudentPredictor(student, d), opt, torch.device('cpu'))


def _ddp_worker(opt):
    """Two training steps of each method, validation, then every replica's parameters and buffers."""
    import torch.distributed as dist
    import train_student
    from helper.loops import to_batch, train_step, unwrap, validate
    from helper.trainer import setup_device

    def flat(tensors):
        return torch.cat([t.detach().reshape(-1).double() for t in tensors] + [torch.zeros(0, dtype=torch.float64)])

    for method in ('simkd', 'reviewkd'):
        o = train_student.parse_option(['--path-t', opt.path_t, '--distill', method, '--model_s', RUNS[method][0],
                                        '--skip-validation'] + RUNS[method][1] + TINY)
        o.distributed, o.rank, o.world_size, o.local_rank = True, opt.rank, opt.world_size, opt.local_rank
        o.batch_size //= opt.world_size
        device = setup_device(o)
        trainer = train_student.build_trainer(o, device)
        trainer.train_sampler.set_epoch(1)
        trainer.objective.train()
        for step, data in zip(range(2), trainer.train_loader):
            x, batch = to_batch(data, device)
            train_step(trainer.objective, trainer.optimizer, x, batch, o, device)
        acc = validate(trainer.val_loader, trainer.eval_model, o, device)
        student, distiller = unwrap(trainer.modules['model']), unwrap(trainer.modules['distiller'])
        params = flat(list(student.parameters()) + list(distiller.parameters()))
        buffers = flat(list(student.buffers()) + list(distiller.buffers()))
        gathered = []
        for mine in (params, buffers):
            parts = [torch.zeros_like(mine) for _ in range(opt.world_size)]
            dist.all_gather(parts, mine)
            gathered.append(parts)
        if opt.rank == 0:
            torch.save({'replicas': list(zip(*gathered)), 'acc': acc, 'student': student.state_dict(),
                        'distiller': distiller.state_dict()}, os.path.join(opt.out_dir, method + '.pth'))


if __name__ == '__main__':
    # python -m torch.distributed.run --nproc_per_node 2 tests/test_feature_methods.py OUT_DIR TEACHER
    import train_student
    from helper.distributed import launch
    main_opt = train_student.parse_option(['--path-t', sys.argv[2], '--model_s', 'resnet8'] + TINY)
    main_opt.out_dir = sys.argv[1]
    launch(_ddp_worker, main_opt)
