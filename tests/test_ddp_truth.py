"""Multi-process training checked against ground truth computed in a single process.

One launch of 2 gloo processes on the CPU, through ``helper.distributed.launch`` as the entry
scripts use it (``--multiprocessing-distributed --cpu_procs 2``, no ``--seed``), runs every
multi-process check in ``_worker``; the tests below compare what the processes report with
numbers computed here by other means (explicit SGD on the mean gradient of the two halves, the
momentum update of CRD's bank by hand, accuracy over the whole validation set in one pass).
The pure functions (device choice, RNG state on a faked GPU machine, flags) are tested
directly.
"""
import argparse
import copy
import multiprocessing
import os
import random
import socket
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

N_TRAIN, N_VAL = 37, 37  # odd: the shards of two processes are unequal
LR, WD = 0.1, 5e-4
DEADLINE_S = 240


def student_args(path_t, save_root):
    return ['--path-t', str(path_t), '--model_s', 'resnet8', '--distill', 'crd', '-b', '0.8', '--dataset',
            'synthetic', '--synthetic_train_size', str(N_TRAIN), '--synthetic_val_size', str(N_VAL),
            '--batch_size', '16', '--num_workers', '0', '--nce_k', '8', '--learning_rate', str(LR),
            '--weight_decay', str(WD), '--save_root', str(save_root)]


def prototype_model():
    """A linear classifier whose class rows are the mean training image of the class: a fixed model that
    gets part of the validation set right, so the accuracies are neither 0 nor 100."""
    from dataset.synthetic import SyntheticImages
    train_set = SyntheticImages(N_TRAIN, train=True)
    images = torch.stack([train_set.image(i) for i in range(N_TRAIN)]).flatten(1)
    targets = torch.tensor(train_set.targets)
    linear = nn.Linear(images.shape[1], 100)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight.index_add_(0, targets, images / images.shape[1] ** 0.5)
    return nn.Sequential(nn.Flatten(), linear)


class RandomDraws(torch.utils.data.Dataset):
    """Items are draws from the random stream of whoever loads them (the process, or a loader worker)."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.rand(())


def _find(module, cls):
    return next((name, m) for name, m in module.named_modules() if isinstance(m, cls))


def _gather(obj):
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _tiny_ddp():
    from helper.distributed import wrap_ddp
    from helper.loops import ClassifierObjective
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    objective = ClassifierObjective(wrap_ddp(model, torch.device('cpu')))
    return model, objective, torch.optim.SGD(model.parameters(), lr=0.1)


def _nan_batches(rank, n, bad_steps):
    """``n`` batches of 2; rank 1's inputs at ``bad_steps`` are NaN (so its loss is)."""
    g = torch.Generator().manual_seed(rank)
    batches = []
    for step in range(n):
        x = torch.randn(2, 4, generator=g)
        if rank == 1 and step in bad_steps:
            x[0, 0] = float('nan')
        batches.append((x, torch.tensor([0, 1])))
    return batches


def _worker(opt):
    """Every multi-process check; rank 0 saves what all ranks saw, then rank 1 fails on purpose."""
    import warnings

    import helper.loops as loops
    import train_student
    from crd.memory import ContrastMemory
    from dataset import cifar100, get_dataloaders
    from helper.errors import UserError
    from helper.loops import NonFiniteLoss, to_batch, train_epoch, train_step, unwrap, validate
    from helper.trainer import setup_device
    from helper.util import rng_state, set_rng_state

    rank, out = opt.rank, {}
    out['data_seed'] = opt.data_seed

    # --- the epoch's shards, without and with --seed, standard and GPU loaders
    for seed in (None, 5):
        for gpu_loader in (False, True):
            o = copy.copy(opt)
            o.seed, o.gpu_loader = seed, gpu_loader
            _, val_loader, sampler, _ = get_dataloaders(o)
            sampler.set_epoch(1)
            indices = sampler.indices() if gpu_loader else torch.tensor(list(iter(sampler)))
            out['shard', seed, gpu_loader] = indices.tolist()

    # --- validation over unequal shards, reduced
    model = prototype_model()
    out['val_shard'] = len(val_loader.sampler)
    out['val'] = validate(val_loader, model, opt, torch.device('cpu'))

    # --- one distillation step (CRD) on this process's half of the global batch
    device = setup_device(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trainer = train_student.build_trainer(opt, device)
    out['ddp_warnings'] = [str(w.message) for w in caught if 'broadcast_buffers' in str(w.message)]
    student, distiller = trainer.modules['model'], trainer.modules['distiller']
    _, memory = _find(distiller, ContrastMemory)
    out['bank_at_start'] = memory.memory_v1.clone()
    if rank == 0:
        out['init'] = {'model': copy.deepcopy(student.state_dict()), 'distiller': copy.deepcopy(distiller.state_dict())}
    trainer.train_sampler.set_epoch(1)
    x, batch = to_batch(next(iter(trainer.train_loader)), device)
    out['batch'] = (x, batch)
    trainer.objective.train()
    unwrap(trainer.objective.model_s).eval()  # BN on running statistics: a sample's output ignores its batch
    train_step(trainer.objective, trainer.optimizer, x, batch, opt, device)
    out['after'] = {'model': copy.deepcopy(student.state_dict()), 'distiller': copy.deepcopy(distiller.state_dict())}

    # --- RNG state: saved by rank 0 for every rank, restored by each rank from the (broadcast) checkpoint
    state = [rng_state()]
    draws = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
    torch.distributed.broadcast_object_list(state, src=0)
    set_rng_state(state[0])
    out['rng'] = (draws, (torch.rand(3).tolist(), random.random(), float(np.random.rand())))

    # --- seeded runs: the random streams of data-loader workers (and of the process) differ by rank
    o = copy.copy(opt)
    o.seed = 5
    setup_device(o)
    # a forked worker starts in a fraction of the time a spawned one takes
    out['streams'] = {w: next(iter(torch.utils.data.DataLoader(
        RandomDraws(), batch_size=4, num_workers=w, multiprocessing_context='fork' if w else None))).tolist()
        for w in (0, 1)}

    # --- --nan-policy skip: rank 1 alone has a NaN loss at step 0
    step_opt = argparse.Namespace(nan_policy='skip', amp=None, channels_last=False, print_freq=100,
                                  batch_size=2)
    model, objective, optimizer = _tiny_ddp()
    before = [p.detach().clone() for p in model.parameters()]
    skipped = []
    for x, y in _nan_batches(rank, 2, bad_steps={0}):
        x, batch = to_batch((x, y), torch.device('cpu'))
        skipped.append(train_step(objective, optimizer, x, batch, step_opt, torch.device('cpu'))[0] is None)
        if len(skipped) == 1:
            out['unchanged_after_skip'] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    out['skipped'] = skipped
    out['tiny_after'] = [p.detach().clone() for p in model.parameters()]
    # ... and its limit: every step of rank 1 is NaN
    loops.MAX_SKIPPED_STEPS = 2
    try:
        train_epoch(1, _nan_batches(rank, 5, bad_steps=range(5)), objective, optimizer, step_opt,
                    torch.device('cpu'), log=lambda *a: None)
        out['limit'] = None
    except NonFiniteLoss as e:
        out['limit'] = str(e)

    # --- --nan-policy stop: rank 1 alone sees a NaN loss, at the last step
    step_opt.nan_policy = 'stop'
    model, objective, optimizer = _tiny_ddp()
    try:
        train_epoch(1, _nan_batches(rank, 3, bad_steps={2}), objective, optimizer, step_opt,
                    torch.device('cpu'), log=lambda *a: None)
        out['stop'] = None
    except NonFiniteLoss as e:
        out['stop'] = str(e)

    # --- CIFAR-100 download into an empty folder: rank 0 downloads, the others wait for it
    from fake_data import write_fake_cifar100
    downloads = []

    def fake_download(url, download_root, filename, md5):
        downloads.append(rank)
        import time
        time.sleep(0.5)  # a download takes a while: the other process checks the folder meanwhile
        write_fake_cifar100(download_root, n_train=20, n_test=10)

    cifar100.download_and_extract_archive = fake_download
    cifar100.build_datasets(argparse.Namespace(data_folder=opt.out_dir / 'cifar'))
    out['downloads'] = downloads

    everything = _gather(out)
    sys.stdout.flush()  # rank 0 may be stopped as soon as rank 1 fails
    if rank == 0:
        torch.save(everything, opt.out_dir / 'results.pth')
    torch.distributed.barrier()
    if rank == 1:
        raise UserError('deliberate failure on rank 1')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch(opt, out_dir):
    """``launch(_worker, opt)`` with stdout/stderr of the processes in files, and a deadline: a collective
    that waits for a process that left it would otherwise hang the suite."""
    from helper.distributed import launch
    outcome = {}

    def target():
        try:
            launch(_worker, opt)
            outcome['code'] = 0
        except SystemExit as e:
            outcome['code'] = e.code
        except BaseException as e:  # noqa: B902 - reported by the test
            outcome['error'] = repr(e)

    saved = [os.dup(1), os.dup(2)]
    files = [open(out_dir / 'stdout', 'w'), open(out_dir / 'stderr', 'w')]
    try:
        for fd, f in zip((1, 2), files):
            os.dup2(f.fileno(), fd)
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(DEADLINE_S)
        if thread.is_alive():
            for child in multiprocessing.active_children():
                child.kill()
            thread.join(30)
            outcome['error'] = ('the processes did not finish within {} s: a collective waited for a process that '
                                'had left it'.format(DEADLINE_S))
    finally:
        for fd, s in zip((1, 2), saved):
            os.dup2(s, fd)
            os.close(s)
        for f in files:
            f.close()
    outcome['stdout'] = (out_dir / 'stdout').read_text()
    outcome['stderr'] = (out_dir / 'stderr').read_text()
    return outcome


@pytest.fixture(scope='module')
def path_t(tmp_path_factory):
    from models import model_dict
    folder = tmp_path_factory.mktemp('ddp_truth') / 'resnet8_vanilla'
    folder.mkdir()
    torch.manual_seed(0)
    torch.save({'model': model_dict['resnet8'](num_classes=100).state_dict()}, folder / 'ckpt.pth')
    return folder / 'ckpt.pth'


@pytest.fixture(scope='module')
def two(path_t):
    import train_student
    out_dir = path_t.parent.parent
    opt = train_student.parse_option(student_args(path_t, out_dir / 'save') + [
        '--sync_bn', '--multiprocessing-distributed', '--cpu_procs', '2',
        '--dist-url', 'tcp://127.0.0.1:{}'.format(_free_port())])
    opt.out_dir = out_dir
    outcome = _launch(opt, out_dir)
    assert 'error' not in outcome, '{}\n{}\n{}'.format(outcome['error'], outcome['stdout'][-2000:],
                                                       outcome['stderr'][-3000:])
    results = torch.load(out_dir / 'results.pth', weights_only=False) if (out_dir / 'results.pth').exists() else None
    assert results is not None, outcome['stderr'][-3000:]
    outcome['ranks'] = results
    return outcome


def test_processes_share_the_data_seed_and_shards_are_disjoint(two):
    r0, r1 = two['ranks']
    assert r0['data_seed'] == r1['data_seed']
    for seed in (None, 5):
        for gpu_loader in (False, True):
            a, b = r0['shard', seed, gpu_loader], r1['shard', seed, gpu_loader]
            assert len(a) == len(b) == (N_TRAIN + 1) // 2
            # DistributedSampler's shards: together every image, one of them twice (the padding of an odd set)
            assert sorted(set(a) | set(b)) == list(range(N_TRAIN))
            assert len(set(a) & set(b)) <= 1 and len(set(a)) == len(a) and len(set(b)) == len(b)
            if seed is None:
                assert a != list(range(0, N_TRAIN, 2))  # shuffled


def test_validation_over_unequal_shards_equals_one_pass(two):
    from dataset.synthetic import SyntheticImages
    r0, r1 = two['ranks']
    assert (r0['val_shard'], r1['val_shard']) == (19, 18)
    val_set = SyntheticImages(N_VAL, train=False)
    model = prototype_model()
    x = torch.stack([val_set.image(i) for i in range(N_VAL)])
    y = torch.tensor(val_set.targets)
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, 1).indices
    acc1 = 100.0 * (top5[:, 0] == y).double().mean().item()
    acc5 = 100.0 * (top5 == y[:, None]).any(1).double().mean().item()
    loss = F.cross_entropy(logits, y).item()
    assert 0 < acc1 < 100
    for rank in (r0, r1):
        got1, got5, got_loss = rank['val']
        assert (got1, got5) == pytest.approx((acc1, acc5), abs=1e-4)  # one image is 2.7 %
        assert got_loss == pytest.approx(loss, rel=1e-5)


def test_ddp_step_equals_one_process_with_the_mean_gradient_and_crd_bank_update(two, path_t):
    import train_student
    from crd.criterion import CRDLoss
    from crd.memory import ContrastMemory
    r0, r1 = two['ranks']
    assert not r0['ddp_warnings'] and not r1['ddp_warnings']  # no deprecated broadcast_buffers
    # CRD's banks start as rank 0's on both processes (they were drawn without --seed)
    assert torch.equal(r0['bank_at_start'], r1['bank_at_start'])
    assert torch.equal(r0['bank_at_start'], r0['init']['distiller'][_find_key(r0, 'memory_v1')])

    opt = train_student.parse_option(student_args(path_t, path_t.parent.parent / 'single'))
    opt.distributed, opt.rank, opt.world_size, opt.local_rank, opt.batch_size = False, 0, 1, 0, 8
    trainer = train_student.build_trainer(opt, torch.device('cpu'))
    student, distiller, objective = trainer.modules['model'], trainer.modules['distiller'], trainer.objective
    student.load_state_dict(r0['init']['model'])
    distiller.load_state_dict(r0['init']['distiller'])
    _, memory = _find(distiller, ContrastMemory)
    _, crd = _find(distiller, CRDLoss)
    bank = (memory.memory_v1.clone(), memory.memory_v2.clone())
    halves = [r0['batch'], r1['batch']]
    x = torch.cat([h[0] for h in halves])
    batch = {k: torch.cat([h[1][k] for h in halves]) for k in halves[0][1]}
    assert len(set(batch['index'].tolist())) == 16  # the halves are disjoint
    objective.train()
    student.eval()

    # the bank after the step: every row of the global batch moved towards its new embedding
    with torch.no_grad():
        v1 = crd.embed_s(student(x, is_feat=True)[0][-1])
        v2 = crd.embed_t(objective.model_t(x, is_feat=True)[0][-1])
    m, idx = memory.momentum, batch['index']
    for name, old, v in (('memory_v1', bank[0], v1), ('memory_v2', bank[1], v2)):
        expected = old.clone()
        new = m * old[idx] + (1 - m) * v
        expected[idx] = new / new.norm(dim=1, keepdim=True)
        for rank in (r0, r1):
            assert torch.allclose(rank['after']['distiller'][_find_key(r0, name)], expected, atol=1e-6)

    # CRD's normalisation constants come from the first global batch: one pass over it fixes them
    with torch.no_grad():
        objective(x, batch)
    # the mean of the two halves' gradients, each half against the bank as it was before the step
    for half_x, half_batch in halves:
        memory.memory_v1.copy_(bank[0])
        memory.memory_v2.copy_(bank[1])
        (objective(half_x, half_batch)[0] / 2).backward()
    for prefix, module in (('model', student), ('distiller', distiller)):
        n_params = 0
        for name, p in module.named_parameters():
            # SGD's first step: the momentum buffer is the gradient itself
            expected = p.detach() - LR * (p.grad + WD * p.detach())
            for rank in (r0, r1):
                assert torch.allclose(rank['after'][prefix][name], expected, rtol=1e-4, atol=1e-6), (prefix, name)
            n_params += p.numel()
        assert n_params > 1000


def _find_key(ranks_entry, buffer):
    (key,) = [k for k in ranks_entry['init']['distiller'] if k.endswith('contrast.' + buffer)]
    return key


def test_each_process_restores_its_own_random_state(two):
    r0, r1 = two['ranks']
    for rank in (r0, r1):
        before, after = rank['rng']
        assert before == after
    assert r0['rng'][0] != r1['rng'][0]


def test_seeded_processes_draw_different_random_streams(two):
    r0, r1 = two['ranks']
    for workers in (0, 1):
        assert r0['streams'][workers] != r1['streams'][workers]


def test_nan_skip_is_decided_by_all_processes_and_limited(two):
    r0, r1 = two['ranks']
    for rank in (r0, r1):
        assert rank['skipped'] == [True, False] and rank['unchanged_after_skip']
        assert rank['limit'] is not None and 'more than 2 steps' in rank['limit']
    assert all(torch.equal(a, b) for a, b in zip(r0['tiny_after'], r1['tiny_after']))
    assert r0['limit'] == r1['limit']  # both stop at the same step


def test_non_finite_loss_on_one_process_stops_all(two):
    r0, r1 = two['ranks']
    assert r0['stop'] is not None and r0['stop'] == r1['stop']
    assert 'step 2' in r0['stop']


def test_cifar_downloaded_once(two):
    r0, r1 = two['ranks']
    assert (r0['downloads'], r1['downloads']) == ([0], [])


def test_error_on_rank_1_is_printed_with_its_rank_and_exits_nonzero(two):
    assert two['code'] == 2
    assert 'error (rank 1): deliberate failure on rank 1' in two['stderr']


def test_small_batch_warning_and_sync_bn_note_on_cpu(two):
    out = two['stdout']
    assert out.count('note: --sync_bn needs GPUs (NCCL); ignored on CPU processes') == 1  # rank 0 only
    assert out.count('warning: 8 images per process') == 1


# ---------------------------------------------------------------- single-process pieces


def test_device_of_each_process():
    from helper.distributed import local_cuda_index, process_device
    from helper.errors import UserError
    assert local_cuda_index(1, 4, [2, 3]) == 3  # torchrun --gpu_id 2,3: local rank 1 takes GPU 3
    assert local_cuda_index(2, 4) == 2
    assert local_cuda_index(3, 1) == 0  # a scheduler shows each task its one GPU
    with pytest.raises(UserError):
        local_cuda_index(0, 4, [5])
    with pytest.raises(UserError):
        local_cuda_index(2, 4, [0, 1])
    opt = argparse.Namespace(local_rank=1, cpu_procs=0, gpu_ids=[2, 3])
    assert process_device(opt, device_count=4) == torch.device('cuda', 3)
    assert process_device(opt, device_count=0) == torch.device('cpu')
    opt.cpu_procs = 2
    assert process_device(opt, device_count=4) == torch.device('cpu')


def test_torchrun_maps_local_ranks_through_gpu_id(monkeypatch):
    import helper.distributed as hd
    seen = {}
    monkeypatch.setattr(hd, '_run_process', lambda worker, opt, url: seen.update(opt=opt, url=url))
    monkeypatch.setenv('RANK', '3')
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    opt = argparse.Namespace(gpu_id='4,6', multiprocessing_distributed=False, cpu_procs=0)
    hd.launch(None, opt)
    assert seen['url'] == 'env://' and seen['opt'].gpu_ids == [4, 6]
    assert hd.process_device(seen['opt'], device_count=8) == torch.device('cuda', 6)
    assert 'CUDA_VISIBLE_DEVICES' not in os.environ


def test_process_group_binds_nccl_to_the_device():
    from helper.distributed import init_args
    gpu = torch.device('cuda', 1)
    assert init_args(gpu) == {'backend': 'nccl', 'device_id': gpu}
    assert init_args(torch.device('cpu')) == {'backend': 'gloo'}


def test_sync_bn_converts_in_place_keeping_the_optimised_parameters():
    """What wrap_ddp relies on for --sync_bn, short of running SyncBatchNorm (DDP accepts it on GPUs only)."""
    from helper.distributed import use_sync_bn
    from models import model_dict
    model = model_dict['resnet8'](num_classes=10)
    params = list(model.parameters())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model and all(a is b for a, b in zip(params, model.parameters()))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 9  # resnet8's BatchNorm layers
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    opt = argparse.Namespace(sync_bn=True, rank=0, batch_size=32)
    assert use_sync_bn(opt, torch.device('cuda', 0)) is True
    assert use_sync_bn(opt, torch.device('cpu')) is False


class FakeOneGPU:
    """torch.cuda of a machine with one GPU: states of devices beyond it cannot be set."""

    def __init__(self, monkeypatch):
        self.set = {}
        for name, value in (('is_available', lambda: True), ('is_initialized', lambda: True),
                            ('device_count', lambda: 1), ('current_device', lambda: 0),
                            ('get_rng_state', self.get_rng_state), ('set_rng_state', self.set_rng_state),
                            ('get_rng_state_all', lambda: [self.get_rng_state(0)]),
                            ('set_rng_state_all', lambda states: [self.set_rng_state(s, i)
                                                                  for i, s in enumerate(states)])):
            monkeypatch.setattr(torch.cuda, name, value)

    def get_rng_state(self, device='cuda'):
        return torch.full((4,), 7, dtype=torch.uint8)

    def set_rng_state(self, state, device='cuda'):
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= 1:
            raise IndexError('CUDA device {} does not exist'.format(index))
        self.set[index] = state


def test_rng_state_of_a_run_on_more_gpus_restores_on_one(monkeypatch):
    from helper.util import rng_state, set_rng_state
    fake = FakeOneGPU(monkeypatch)
    # a checkpoint of a version that saved every visible GPU's state, from a 2-GPU machine
    state = rng_state()
    state['cuda'] = [torch.full((4,), 1, dtype=torch.uint8), torch.full((4,), 2, dtype=torch.uint8)]
    set_rng_state(state)
    assert torch.equal(fake.set[0], state['cuda'][0])
    # this version saves the process's own device only
    assert torch.equal(rng_state()['cuda'], fake.get_rng_state(0))


def test_rng_state_of_another_process_count_is_not_restored():
    from helper.util import set_rng_state
    saved = {'world_size': 2, 'ranks': [None, None]}
    with pytest.warns(UserWarning, match='random state of 2 process'):
        set_rng_state(saved)


def test_pin_memory_follows_the_process_device(monkeypatch):
    from dataset import get_dataloaders
    from helper.options import add_common_args, finish_common
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # CPU processes on a GPU machine
    opt = finish_common(add_common_args(argparse.ArgumentParser()).parse_args(
        ['--dataset', 'synthetic', '--synthetic_train_size', '8', '--synthetic_val_size', '4', '--num_workers',
         '0', '--batch_size', '4']), 'resnet8')
    for device, pinned in (('cpu', False), ('cuda:0', True)):
        opt.device = device
        train_loader, val_loader, _, _ = get_dataloaders(opt)
        assert train_loader.pin_memory is pinned and val_loader.pin_memory is pinned


@pytest.mark.parametrize('lr', ['-1', '0'])
def test_non_positive_learning_rate_is_a_user_error(lr):
    from helper.errors import UserError
    from helper.options import add_common_args, finish_common
    opt = add_common_args(argparse.ArgumentParser()).parse_args(['--learning_rate', lr])
    with pytest.raises(UserError, match='--learning_rate must be positive'):
        finish_common(opt, 'resnet8')


def test_last_progress_line_counts_the_images_it_timed(monkeypatch):
    """Batches of 16, 16 and 9 images at a constant 16 images per (fake) second: one line, 16 img/s."""
    import helper.loops as loops
    from helper.loops import ClassifierObjective, train_epoch
    clock = [0.0]

    class Model(nn.Linear):
        def forward(self, x):
            clock[0] += x.shape[0] / 16.0
            return super().forward(x)

    class FakeTime:
        @staticmethod
        def time():
            return clock[0]

    monkeypatch.setattr(loops, 'time', FakeTime)
    model = Model(4, 3)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(n, 4, generator=g), torch.zeros(n, dtype=torch.long)) for n in (16, 16, 9)]
    opt = argparse.Namespace(nan_policy='stop', amp=None, channels_last=False, print_freq=3, batch_size=16)
    lines = []
    train_epoch(1, loader, ClassifierObjective(model), torch.optim.SGD(model.parameters(), lr=0.1), opt,
                torch.device('cpu'), log=lines.append)
    assert len(lines) == 1 and ' 16 img/s ' in lines[0]
