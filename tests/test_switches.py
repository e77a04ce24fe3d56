"""Speed switches (--amp, --channels_last, --compile) run semckd and crd and stay close to fp32."""
import functools

import pytest
import torch

import train_student
from helper.loops import to_batch, train_step
from helper.trainer import setup_device
from models import model_dict
from models.ShuffleNetv1 import channel_shuffle as shuffle_v1
from models.ShuffleNetv2 import channel_shuffle as shuffle_v2


@pytest.fixture(scope='module')
def path_t(tmp_path_factory):
    folder = tmp_path_factory.mktemp('switch') / 'resnet8_vanilla'
    folder.mkdir()
    torch.manual_seed(0)
    torch.save({'model': model_dict['resnet8'](num_classes=100).state_dict()}, folder / 'ckpt.pth')
    return folder / 'ckpt.pth'


def build(path_t, distill, *switches):
    opt = train_student.parse_option([
        '--path-t', str(path_t), '--model_s', 'resnet8', '--distill', distill, '-b', '1', '--dataset', 'synthetic',
        '--synthetic_train_size', '32', '--synthetic_val_size', '16', '--batch_size', '8', '--num_workers', '0',
        '--nce_k', '16', '--seed', '5', '--learning_rate', '0.01'] + list(switches))
    opt.distributed, opt.rank, opt.world_size, opt.local_rank = False, 0, 1, 0
    device = setup_device(opt)
    return opt, device, train_student.build_trainer(opt, device)


def first_losses(path_t, distill, *switches, steps=2):
    opt, device, trainer = build(path_t, distill, *switches)
    trainer.train_sampler.set_epoch(1)
    trainer.objective.train()
    losses = []
    for _, data in zip(range(steps), trainer.train_loader):
        x, batch = to_batch(data, device)
        if opt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, _, terms = train_step(trainer.objective, trainer.optimizer, x, batch, opt, device, trainer.scaler)
        losses.append([float(loss.detach())] + [float(v.detach()) for v in terms.values()])
    return torch.tensor(losses)


@functools.lru_cache(maxsize=None)
def fp32_losses(path_t, distill):
    """The plain (NCHW, float32) run's losses, computed once per method for every switch compared with it."""
    return first_losses(path_t, distill, '--channels_last', 'off')


@pytest.mark.parametrize('distill', ['semckd', 'crd'])
@pytest.mark.parametrize('switches,rtol', [(('--channels_last',), 1e-4), (('--amp', 'bf16'), 5e-2),
                                           (('--amp', 'fp16'), 2e-2)])
def test_switch_gives_finite_losses_close_to_fp32(path_t, distill, switches, rtol):
    reference = fp32_losses(path_t, distill)
    switched = first_losses(path_t, distill, *switches)
    assert torch.isfinite(switched).all()
    # each term within rtol of the total loss: a near-zero KL term has no meaningful relative error in bf16
    scale = reference[:, :1].abs()
    assert ((switched - reference).abs() <= rtol * scale).all(), (switched, reference)


def test_the_teacher_form_changes_only_rounding(path_t):
    # the default teacher on the CPU (folded, TorchScript) against the teacher as loaded: same batches, same
    # random draws, the same losses up to float rounding
    default = fp32_losses(path_t, 'semckd')
    as_is = first_losses(path_t, 'semckd', '--channels_last', 'off', '--no_fold_teacher')
    assert torch.allclose(default, as_is, rtol=1e-5, atol=1e-6), (default, as_is)


def test_compile_matches_eager(path_t):
    reference = fp32_losses(path_t, 'semckd')
    compiled = first_losses(path_t, 'semckd', '--compile')
    assert torch.allclose(compiled, reference, rtol=1e-3, atol=1e-4), (compiled, reference)


def test_compile_covers_teacher_student_and_method(path_t):
    _, _, trainer = build(path_t, 'semckd', '--compile')
    objective = trainer.objective
    for module in (objective.model_s, objective.model_t, objective.distiller):
        assert isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


@pytest.mark.parametrize('choice,expected', [([], True), (['--channels_last'], True),
                                             (['--channels_last', 'on'], True), (['--channels_last', 'off'], False)])
def test_channels_last_covers_the_method_and_is_on_by_default_on_the_cpu(path_t, choice, expected):
    opt, device, trainer = build(path_t, 'semckd', *choice)
    assert device.type == 'cpu' and opt.channels_last is expected  # parameters.json records the bool
    objective = trainer.objective
    def convs(module):  # weights whose NCHW and NHWC layouts differ
        return [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]

    # SemCKD's projection heads are most of its work: they follow the switch too
    assert len(convs(objective.distiller)) >= 3
    for module in (objective.model_s, objective.model_t, objective.distiller):
        for p in convs(module):
            assert p.is_contiguous(memory_format=torch.channels_last) == expected
            assert p.is_contiguous() == (not expected)


@pytest.mark.parametrize('shuffle,groups', [(shuffle_v1, 3), (shuffle_v1, 2), (shuffle_v2, 2)])
def test_channel_shuffle_keeps_channels_last(shuffle, groups):
    torch.manual_seed(0)
    x = torch.randn(2, 12, 5, 3)
    # ground truth: output channel i * groups + g is input channel g * (12 // groups) + i
    expected = torch.stack([x[:, g * (12 // groups) + i] for i in range(12 // groups) for g in range(groups)], 1)
    nchw = shuffle(x, groups)
    nhwc = shuffle(x.contiguous(memory_format=torch.channels_last), groups)
    assert torch.equal(nchw, expected) and nchw.is_contiguous()
    assert torch.equal(nhwc, expected)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()


PAGE_FAULTS = """
import resource, sys, torch
from helper.trainer import keep_freed_memory
if sys.argv[1] == 'keep':
    keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # a forward pass keeps its activations until the backward pass frees them
    return [torch.empty(4 << 20).fill_(1) for _ in range(8)]  # 16 MB each: resnet32x4's at batch 64
step()
before = faults()
for _ in range(10):
    step()
print(faults() - before)
"""


def test_the_cpu_run_keeps_freed_memory_instead_of_faulting_it_in_again():
    import subprocess
    import sys
    from conftest import script_env
    counts = {how: int(subprocess.run([sys.executable, '-c', PAGE_FAULTS, how], env=script_env(), check=True,
                                      capture_output=True, text=True).stdout) for how in ('default', 'keep')}
    # by default glibc hands freed blocks back to the kernel and the next steps fault them in again (4096 pages
    # per block; measured: about one block per step); kept, the steps reuse them (at most one block faulted)
    assert counts['default'] > 5 * 4096 and counts['keep'] <= 4096 + 256, counts
