"""The training step never waits for the device: no host sync in any method's step.

On a GPU a host sync (``.item()``, ``bool(t)``, boolean-mask indexing, a tensor built from host
data) stalls the CPU until the device has caught up, so the next kernels are queued late. A CPU
cannot show that in time, but it can count the calls: ``SyncRecorder`` records every function
that needs a value on the host (at the Python level with a TorchFunctionMode, and below it, where
``.item()``, ``nonzero`` and bool-mask indexing become aten operations, with a
TorchDispatchMode) and every tensor built from host data. Every registered method runs one
``train_step`` (plus the loop's per-step metric and NaN-watch updates) of resnet8x4 -> resnet8x4 at
batch 8 under it; none needs an exception. With a GPU the same steps also run under
``torch.cuda.set_sync_debug_mode('error')``.

Also here: the sync-free forms of two formulas against the originals they replace (RKD's mean of
positive distances, CRD's normalisation constants fixed once, with no all-reduce after the first
batch).
"""
import collections
import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import train_student
from crd import memory as crd_memory
from distiller_zoo import DISTILLERS, RKDLoss
from helper.loops import _NonFiniteWatch, _prepare_input, to_batch, train_step
from helper.util import Meter, set_seed
from models import model_dict

# Python-level calls that hand a tensor's value to the host
SYNC_FUNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero,
              torch.nonzero, torch.Tensor.unique, torch.unique, torch.equal, torch.allclose, torch.is_nonzero}
# aten operations whose result (or its size) the host must read
SYNC_OPS = {'_local_scalar_dense', 'nonzero', 'masked_select', 'repeat_interleave', 'is_nonzero', 'equal',
            '_unique', '_unique2', 'unique_dim', 'unique_consecutive', 'bincount', 'histc'}
# indexing with a boolean mask hides a nonzero() on a GPU (the CPU kernel does it inside)
INDEX_OPS = {'index', 'index_put', 'index_put_', '_index_put_impl_'}


class _Functions(TorchFunctionMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNC_FUNCS:
            self.calls[getattr(func, '__name__', str(func))] += 1
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split('::')[-1]
        if name in SYNC_OPS:
            self.calls['aten.' + name] += 1
        elif name in INDEX_OPS and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.calls['aten.{} with a bool mask'.format(name)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def sync_recorder(monkeypatch):
    """Yields a Counter of the host syncs made inside the block."""
    calls = collections.Counter()

    def from_host(make, name):
        def wrapped(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor):  # host data copied to the device (pageable: a sync)
                calls[name + ' from host data'] += 1
            return make(data, *args, **kwargs)
        return wrapped

    with monkeypatch.context() as patch:
        patch.setattr(torch, 'tensor', from_host(torch.tensor, 'torch.tensor'))
        patch.setattr(torch, 'as_tensor', from_host(torch.as_tensor, 'torch.as_tensor'))
        with _Functions(calls), _Ops(calls):
            yield calls


# ---------------------------------------------------------------- the recorder sees what it must

@pytest.mark.parametrize('sync', ['item', 'bool', 'float', 'tolist', 'mask_index', 'mask_assign', 'nonzero',
                                  'host_tensor'])
def test_recorder_catches_each_kind_of_sync(monkeypatch, sync):
    t = torch.randn(6)
    actions = {
        'item': lambda: t.sum().item(),
        'bool': lambda: bool(t.sum() > 0),
        'float': lambda: float(t.sum()),
        'tolist': lambda: t.tolist(),
        'mask_index': lambda: t[t > 0].mean(),
        'mask_assign': lambda: t.clone().__setitem__(t > 0, 0.0),
        'nonzero': lambda: torch.nonzero(t > 0),
        'host_tensor': lambda: torch.tensor(float(t.numel())),
    }
    with sync_recorder(monkeypatch) as calls:
        actions[sync]()
    assert sum(calls.values()) > 0


def test_recorder_passes_device_only_work(monkeypatch):
    t = torch.randn(6, requires_grad=True)
    with sync_recorder(monkeypatch) as calls:
        positive = t > 0
        (torch.where(positive, t, torch.zeros_like(t)).sum() / positive.sum()).backward()
        torch.full((), 3.0).add_(t.detach().sum())
    assert not calls, dict(calls)


# ---------------------------------------------------------------- every method's step

@pytest.fixture(scope='module')
def path_t(tmp_path_factory):
    folder = tmp_path_factory.mktemp('nosync') / 'resnet8x4_vanilla'
    folder.mkdir()
    torch.manual_seed(0)
    torch.save({'model': model_dict['resnet8x4'](num_classes=100).state_dict()}, folder / 'ckpt.pth')
    return folder / 'ckpt.pth'


def build(path_t, distill, device, *flags):
    opt = train_student.parse_option([
        '--path-t', str(path_t), '--model_s', 'resnet8x4', '--distill', distill, '-b', '1', '--dataset', 'synthetic',
        '--synthetic_train_size', '32', '--synthetic_val_size', '8', '--batch_size', '8', '--num_workers', '0',
        '--nce_k', '16', '--seed', '3'] + list(flags))
    opt.distributed, opt.rank, opt.world_size, opt.local_rank = False, 0, 1, 0
    set_seed(opt.seed)
    trainer = train_student.build_trainer(opt, device)
    trainer.train_sampler.set_epoch(1)
    trainer.objective.train()
    return opt, trainer


def loop_body(trainer, opt, device, x, batch, idx, meter, watch):
    """What train_epoch does per step between two progress lines."""
    loss, logits, terms = train_step(trainer.objective, trainer.optimizer, x, batch, opt, device, trainer.scaler)
    watch.update(idx, terms)
    meter.update(loss, logits, batch['target'])
    return loss


@pytest.mark.parametrize('distill', sorted(DISTILLERS))
def test_step_makes_no_host_sync(path_t, distill, monkeypatch):
    device = torch.device('cpu')
    opt, trainer = build(path_t, distill, device)
    meter, watch = Meter(device), _NonFiniteWatch(device)
    for idx, data in zip(range(2), trainer.train_loader):
        x, batch = to_batch(data, device)
        x = _prepare_input(x, opt)
        with sync_recorder(monkeypatch) as calls:
            loss = loop_body(trainer, opt, device, x, batch, idx, meter, watch)
        assert not calls, '{} step {} syncs: {}'.format(distill, idx, dict(calls))
    assert torch.isfinite(loss)
    assert meter.values()[3] == 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
@pytest.mark.parametrize('amp', [None, 'fp16'])
@pytest.mark.parametrize('distill', sorted(DISTILLERS))
def test_step_makes_no_host_sync_on_a_gpu(path_t, distill, amp):
    device = torch.device('cuda')
    opt, trainer = build(path_t, distill, device, *(['--amp', amp] if amp else []))
    meter, watch = Meter(device), _NonFiniteWatch(device)
    for idx, data in zip(range(3), trainer.train_loader):
        x, batch = to_batch(data, device)
        x = _prepare_input(x, opt)
        torch.cuda.synchronize()
        # the first step may set up (cuDNN autotuning, the scaler's state); the later ones must not wait
        if idx > 0:
            torch.cuda.set_sync_debug_mode('error')
        try:
            loop_body(trainer, opt, device, x, batch, idx, meter, watch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert meter.values()[3] == 24


# ---------------------------------------------------------------- the sync-free formulas

def test_rkd_positive_mean_is_the_boolean_index_mean():
    torch.manual_seed(0)
    d = torch.rand(7, 7, dtype=torch.float64)
    d[d < 0.3] = 0  # zeros anywhere, not only on the diagonal
    d[0, 1] = -0.5
    expected = sum(v for v in d.flatten().tolist() if v > 0) / sum(1 for v in d.flatten().tolist() if v > 0)
    assert abs(RKDLoss.positive_mean(d).item() - expected) < 1e-12


def _rkd_reference(f_s, f_t):
    """RKDLoss with the reference's boolean-indexed means (RepDistiller distiller_zoo/RKD.py)."""
    student, teacher = f_s.reshape(len(f_s), -1), f_t.reshape(len(f_t), -1)
    t_d = RKDLoss.pdist(teacher)
    t_d = t_d / t_d[t_d > 0].mean()
    d = RKDLoss.pdist(student)
    d = d / d[d > 0].mean()
    loss_d = torch.nn.functional.smooth_l1_loss(d, t_d)
    loss_a = torch.nn.functional.smooth_l1_loss(RKDLoss.angles(student), RKDLoss.angles(teacher))
    return 25 * loss_d + 50 * loss_a


def test_rkd_loss_and_gradient_equal_the_boolean_index_form():
    torch.manual_seed(1)
    f_s = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    ours = RKDLoss()(f_s, f_t)
    (grad,) = torch.autograd.grad(ours, f_s)
    ref = _rkd_reference(f_s, f_t)
    (ref_grad,) = torch.autograd.grad(ref, f_s)
    # the same sums in another order: equal to float64 rounding
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12 * float(ref_grad.abs().max()))


def test_crd_constants_are_fixed_once_with_one_all_reduce_per_load(monkeypatch):
    """Two processes with identical batches, simulated: the all-reduce doubles, the mean halves."""
    reduces = []

    def fake_all_reduce(t):
        reduces.append(float(t))
        t.mul_(2)

    def fake_all_gather(parts, t):
        for p in parts:
            p.copy_(t)

    torch.manual_seed(2)
    memory = crd_memory.ContrastMemory(8, 20, K=5, T=0.5, momentum=0.5)
    state = {k: v.clone() for k, v in memory.state_dict().items()}
    batches = [(torch.nn.functional.normalize(torch.randn(4, 8), dim=1),
                torch.nn.functional.normalize(torch.randn(4, 8), dim=1),
                torch.randperm(20)[:4], torch.randint(0, 20, (4, 6))) for _ in range(3)]

    # single process, first batch by hand: Z = n_data * mean of exp(score / T) of that batch
    single = crd_memory.ContrastMemory(8, 20, K=5, T=0.5, momentum=0.5)
    single.load_state_dict(state)
    v1, v2, y, idx = batches[0]
    raw_v1 = torch.exp((state['memory_v2'][idx] @ v1.unsqueeze(2)).squeeze(2) / 0.5)
    expected_z1 = 20 * raw_v1.mean()
    outs_single = [single(*b) for b in batches]
    torch.testing.assert_close(single.Z_v1, expected_z1)

    monkeypatch.setattr(crd_memory, '_world_size', lambda: 2)
    monkeypatch.setattr(torch.distributed, 'all_reduce', fake_all_reduce)
    monkeypatch.setattr(torch.distributed, 'all_gather', fake_all_gather)
    memory.load_state_dict(state)
    outs = []
    for i, b in enumerate(batches):
        outs.append(memory(*b))
        assert len(reduces) == 2, 'step {}: {} all-reduces in all (two on the first batch, then none)'.format(
            i, len(reduces))
    # the rows of the "other process" are the same samples: the banks and scores equal one process's
    for (a1, a2), (b1, b2) in zip(outs, outs_single):
        torch.testing.assert_close(a1, b1)
        torch.testing.assert_close(a2, b2)
    torch.testing.assert_close(memory.Z_v1, single.Z_v1)

    # a loaded state fixes nothing by itself: one more look (kept values, no change) after each load
    saved = {k: v.clone() for k, v in memory.state_dict().items()}
    memory.load_state_dict(saved)
    memory(*batches[0])
    memory(*batches[1])
    assert len(reduces) == 4
    torch.testing.assert_close(memory.Z_v1, saved['Z_v1'])
    torch.testing.assert_close(memory.Z_v2, saved['Z_v2'])


def test_sgd_is_fused_on_a_gpu_only_and_a_loaded_state_keeps_that(path_t):
    # fused SGD takes GradScaler's overflow flag as a device tensor; the unfused step reads it with .item()
    _, trainer = build(path_t, 'kd', torch.device('cpu'))
    optimizer = trainer.optimizer
    assert not any(g['fused'] for g in optimizer.param_groups)
    state = optimizer.state_dict()
    for group in state['param_groups']:
        group['fused'] = True  # as saved by a run on a GPU
    optimizer.load_state_dict(state)
    assert not any(g['fused'] for g in optimizer.param_groups)
    if torch.cuda.is_available():
        _, trainer = build(path_t, 'kd', torch.device('cuda'))
        assert all(g['fused'] for g in trainer.optimizer.param_groups)
        assert trainer.optimizer._step_supports_amp_scaling
