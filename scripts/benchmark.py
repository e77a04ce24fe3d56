"""Time the training step of distillation methods, through train_student.py's own code.

    python scripts/benchmark.py --model_t resnet32x4 --model_s resnet8x4 --distill kd semckd crd \\
        --batch_size 64 --steps 10 --warmup 2 [--amp bf16] [--channels_last] [--compile] [--gpu_loader] \\
        [--out bench.json]

Each (method, batch size) is built by ``train_student.parse_option`` and ``train_student.build_trainer``, so what
is timed is exactly the run ``train_student.py`` would make with the same flags; any flag this script does not
know goes to train_student's parser (``--nce_k 4096``, ``--num_workers 0``, ``--amp bf16``, ...). The teacher is
randomly initialised (speed does not depend on its weights): a ``{'model': state_dict}`` checkpoint written to a
temporary ``{model_t}_vanilla/`` folder. By default the data are ``--dataset synthetic`` with CIFAR-100's 50000
training images (CRD's memory bank and negatives have CIFAR's size), so nothing needs downloading.

Per configuration: ``--warmup`` steps, then ``--steps`` timed steps of ``helper.loops.train_step`` on batches of
the run's train loader. On the CPU each step is clocked on the host: waiting for the next batch and moving it
to the device + the train step. On a GPU a clock read would need a host sync, which training never makes:
the ``--steps`` batches are loaded and moved to the device first (host clock per batch, one sync at the end:
the data time), then the steps run back to back with a CUDA event recorded between consecutive steps, read
after one final sync, so ms/step there is the device's time per step without data loading. Reported:
median, min/max and quartiles of ms/step, images/s (batch * 1000 / median ms), the data share (time
waiting for batches / total; on a GPU data / (data + steps), as if loading did not overlap), peak memory
(``torch.cuda.max_memory_allocated`` on a GPU, the process's max RSS on the CPU) and the floating-point work
of one step (student and adapters forward + backward, teacher forward; ``torch.utils.flop_counter``), with
the achieved rate as a fraction of the device's own matmul rate, measured once at start with a large matmul
in the step's precision (on a GPU in fp32 PyTorch's matmuls default to full fp32 while cuDNN's convolutions
use TF32, so an fp32 step can exceed 100%; on the CPU a 1024x1024 matmul is not the peak either). Each
configuration runs in a fresh process (``--in_process`` to share one), so peak memory and RSS belong to that
configuration alone.

Prints a table; ``--out FILE`` also writes every number as JSON.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from helper.errors import UserError  # noqa: E402

RESULT_FIELDS = (
    'method', 'model_t', 'model_s', 'batch_size', 'dataset', 'amp', 'channels_last', 'compile', 'gpu_loader',
    'num_workers', 'warmup', 'steps', 'ms_per_step_median', 'ms_per_step_min', 'ms_per_step_max',
    'ms_per_step_p25', 'ms_per_step_p75', 'images_per_s', 'data_ms_median', 'data_share', 'flops_per_step',
    'flops_teacher_forward', 'flops_student_and_adapters', 'achieved_tflops', 'matmul_fraction',
    'peak_memory_mb', 'peak_memory_kind', 'params_student_M', 'params_adapters_M', 'teacher_form', 'device',
    'error')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model_t', default='resnet32x4', help='teacher architecture (randomly initialised)')
    parser.add_argument('--model_s', default='resnet8x4', help='student architecture')
    parser.add_argument('--distill', nargs='+', default=['kd'], help='methods to time, one row each')
    parser.add_argument('--batch_size', nargs='+', type=int, default=[64], help='batch sizes to time')
    parser.add_argument('--steps', type=int, default=10, help='timed steps per configuration')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps first (compilation, caches)')
    parser.add_argument('--dataset', default='synthetic', help="train_student's --dataset (default: no data)")
    parser.add_argument('--synthetic_train_size', type=int, default=50000,
                        help="synthetic training images (default CIFAR-100's 50000)")
    parser.add_argument('--out', default=None, help='write the results as JSON here')
    parser.add_argument('--in_process', action='store_true',
                        help='run every configuration in this process (peak RSS then accumulates)')
    args, passthrough = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError('--steps must be at least 1 and --warmup at least 0')
    if any(b < 1 for b in args.batch_size):
        raise UserError('--batch_size must be positive')
    from distiller_zoo import DISTILLERS
    from models import model_dict
    for name in (args.model_t, args.model_s):
        if name not in model_dict:
            raise UserError("unknown model '{}'; valid names: {}".format(name, ', '.join(sorted(model_dict))))
    unknown = [m for m in args.distill if m not in DISTILLERS]
    if unknown:
        raise UserError("unknown --distill {}; valid methods: {}".format(', '.join(unknown),
                                                                        ', '.join(sorted(DISTILLERS))))
    return args, passthrough


def write_teacher(folder, model_t, dataset):
    """A randomly initialised ``{'model': state_dict}`` teacher in ``folder/{model_t}_vanilla/``."""
    from dataset import NUM_CLASSES
    from models import build_model
    torch.manual_seed(0)
    model = build_model(model_t, NUM_CLASSES[dataset], dataset=dataset)
    path = os.path.join(folder, '{}_vanilla'.format(model_t), 'ckpt_epoch_0.pth')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'model': model.state_dict()}, path)
    return path


def student_argv(args, passthrough, method, batch_size, teacher_path, save_root):
    # ours first: a flag repeated in the pass-through wins (argparse keeps the last)
    return ['--path-t', teacher_path, '--model_t', args.model_t, '--model_s', args.model_s, '--distill', method,
            '--batch_size', str(batch_size), '--dataset', args.dataset,
            '--synthetic_train_size', str(args.synthetic_train_size), '--skip-validation',
            '--save_root', save_root, '--seed', '0'] + list(passthrough)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def matmul_tflops(device, dtype, size=None, iters=None):
    """The device's rate on one large square matmul, in TFLOP/s (the best of ``iters`` timed runs)."""
    size = size or (8192 if device.type == 'cuda' else 1024)
    iters = iters or (20 if device.type == 'cuda' else 5)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = float('inf')
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best / 1e12


def step_dtype(amp):
    return {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp, torch.float32)


def _percentile(values, q):
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def count_flops(trainer, data, device):
    """(total, teacher forward) FLOPs of one train_step on ``data``, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    from helper.loops import _prepare_input, to_batch, train_step
    objective, opt = trainer.objective, trainer.opt
    # compiled modules run inductor kernels, the TorchScript teacher oneDNN ops, that the counter cannot
    # see; count their eager originals
    from helper.fold_bn import ScriptedTeacher
    names = ('model_s', 'model_t', 'distiller')
    compiled = {name: getattr(objective, name) for name in names}
    for name, module in compiled.items():
        eager = getattr(module, '_orig_mod', module)
        setattr(objective, name, eager.model if isinstance(eager, ScriptedTeacher) else eager)
    try:
        x, batch = to_batch(data, device)
        x = _prepare_input(x, opt)
        with FlopCounterMode(display=False) as counter:
            train_step(objective, trainer.optimizer, x, batch, opt, device, trainer.scaler)
    finally:
        for name, module in compiled.items():
            setattr(objective, name, module)
    # the teacher only runs forward, so its share is attributed without ambiguity
    teacher = sum(sum(counts.values()) for name, counts in counter.get_flop_counts().items()
                  if name.split('.')[1:] == ['model_t'])
    return int(counter.get_total_flops()), int(teacher)


def time_steps_cuda(step, next_input, warmup, steps, device):
    """(ms of each step, ms of loading each batch) on a GPU, with no host sync between the steps.

    Not run by the tests (they have no GPU).
    """
    for _ in range(warmup):
        step(*next_input())
    torch.cuda.synchronize(device)
    inputs, waits = [], []
    for _ in range(steps):
        start = time.perf_counter()
        inputs.append(next_input())
        waits.append((time.perf_counter() - start) * 1e3)
    start = time.perf_counter()
    torch.cuda.synchronize(device)  # the last copies to the device belong to the data time
    waits[-1] += (time.perf_counter() - start) * 1e3
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for event, (x, batch) in zip(events[1:], inputs):
        step(x, batch)
        event.record()
    torch.cuda.synchronize(device)
    return [a.elapsed_time(b) for a, b in zip(events, events[1:])], waits


def measure(argv, warmup, steps, rates):
    """Build one run with train_student's code and time it; -> a result dict (without the config fields)."""
    import train_student
    from helper.loops import _prepare_input, to_batch, train_step
    from helper.trainer import setup_device
    from helper.util import adjust_learning_rate

    opt = train_student.parse_option(argv)
    # what helper.distributed.launch sets for a single process
    opt.distributed, opt.rank, opt.world_size, opt.local_rank = False, 0, 1, 0
    device = setup_device(opt)
    trainer = train_student.build_trainer(opt, device)
    objective, optimizer, loader, sampler = trainer.objective, trainer.optimizer, trainer.train_loader, \
        trainer.train_sampler
    objective.train()
    adjust_learning_rate(1, opt, optimizer)

    epoch = [1]
    if sampler is not None:
        sampler.set_epoch(1)
    batches = [iter(loader)]

    def next_batch():
        try:
            return next(batches[0])
        except StopIteration:  # a short training set: go on with the next epoch, as training would
            epoch[0] += 1
            if sampler is not None:
                sampler.set_epoch(epoch[0])
            batches[0] = iter(loader)
            return next(batches[0])

    def next_input():
        x, batch = to_batch(next_batch(), device)
        return _prepare_input(x, opt), batch

    def step(x, batch):
        train_step(objective, optimizer, x, batch, opt, device, trainer.scaler)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        totals, waits = time_steps_cuda(step, next_input, warmup, steps, device)
        peak, kind = torch.cuda.max_memory_allocated(device) / 2 ** 20, 'cuda_max_allocated'
    else:
        totals, waits = [], []
        for i in range(warmup + steps):
            start = time.perf_counter()
            x, batch = next_input()
            fed = time.perf_counter()
            step(x, batch)
            end = time.perf_counter()
            if i >= warmup:
                totals.append((end - start) * 1e3)
                waits.append((fed - start) * 1e3)
        import resource
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 'max_rss'  # KiB on Linux
    data_share = sum(waits) / (sum(waits) + sum(totals)) if device.type == 'cuda' else sum(waits) / sum(totals)
    flops, teacher_flops = count_flops(trainer, next_batch(), device)

    median = statistics.median(totals)
    rate = rates.get(str(step_dtype(opt.amp)).replace('torch.', ''))
    achieved = flops / (median / 1e3) / 1e12
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    return {
        'num_workers': opt.num_workers if not opt.gpu_loader else 0,
        'ms_per_step_median': median, 'ms_per_step_min': min(totals), 'ms_per_step_max': max(totals),
        'ms_per_step_p25': _percentile(totals, 0.25), 'ms_per_step_p75': _percentile(totals, 0.75),
        'images_per_s': opt.batch_size * 1e3 / median,
        'data_ms_median': statistics.median(waits), 'data_share': data_share,
        'flops_per_step': flops, 'flops_teacher_forward': teacher_flops,
        'flops_student_and_adapters': flops - teacher_flops,
        'achieved_tflops': achieved, 'matmul_fraction': achieved / rate if rate else None,
        'peak_memory_mb': peak, 'peak_memory_kind': kind,
        'params_student_M': n_params(trainer.modules['model']),
        'params_adapters_M': n_params(trainer.modules['distiller']),
        'teacher_form': opt.teacher_form, 'device': str(device), 'error': None,
    }


def _child(argv, warmup, steps, rates, queue):
    try:
        queue.put(measure(argv, warmup, steps, rates))
    except UserError as e:
        queue.put({'error': 'error: {}'.format(e)})
    except Exception as e:  # a failing configuration is one row of the table, not the end of the sweep
        traceback.print_exc()
        queue.put({'error': '{}: {}'.format(type(e).__name__, str(e).splitlines()[0] if str(e) else '')})


def run_isolated(argv, warmup, steps, rates):
    """``measure`` in a fresh process, so its peak memory is its own."""
    import multiprocessing as mp
    import queue as queue_module
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(argv, warmup, steps, rates, queue))
    proc.start()
    result = None
    while result is None:
        try:
            result = queue.get(timeout=1.0)
        except queue_module.Empty:  # is the child still there?
            if not proc.is_alive():
                break
    proc.join()
    if result is None:
        result = {'error': 'the measuring process exited with status {} (out of memory?)'.format(proc.exitcode)}
    return result


def _fmt(value, spec):
    return '-' if value is None else format(value, spec)


def format_table(results):
    header = ('method', 'batch', 'ms/step', 'min', 'max', 'img/s', 'data %', 'GFLOP/step', 'TFLOP/s',
              '% matmul', 'peak MB')
    rows = []
    for r in results:
        if r.get('error'):
            rows.append((r['method'], str(r['batch_size']), r['error']))
            continue
        rows.append((r['method'], str(r['batch_size']), _fmt(r['ms_per_step_median'], '.1f'),
                     _fmt(r['ms_per_step_min'], '.1f'), _fmt(r['ms_per_step_max'], '.1f'),
                     _fmt(r['images_per_s'], '.1f'), _fmt(100 * r['data_share'], '.1f'),
                     _fmt(r['flops_per_step'] / 1e9, '.2f'), _fmt(r['achieved_tflops'], '.3f'),
                     _fmt(None if r['matmul_fraction'] is None else 100 * r['matmul_fraction'], '.1f'),
                     _fmt(r['peak_memory_mb'], '.0f')))
    widths = [max(len(header[i]), max((len(row[i]) for row in rows if len(row) == len(header)), default=0))
              for i in range(len(header))]
    lines = ['  '.join(h.rjust(w) for h, w in zip(header, widths))]
    for row in rows:
        if len(row) == len(header):
            lines.append('  '.join(c.rjust(w) for c, w in zip(row, widths)))
        else:
            lines.append('  '.join([row[0].rjust(widths[0]), row[1].rjust(widths[1]), row[2]]))
    return '\n'.join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, passthrough = parse_args(argv)
    import train_student
    from helper.trainer import setup_device

    with tempfile.TemporaryDirectory(prefix='kd_benchmark_') as tmp:
        teacher_path = write_teacher(tmp, args.model_t, args.dataset)
        configs = [(m, b) for b in args.batch_size for m in args.distill]
        # parse the first configuration here: bad pass-through flags fail before any timing, and the
        # device (and the step's precision) are known for the matmul rate
        first = train_student.parse_option(student_argv(args, passthrough, configs[0][0], configs[0][1],
                                                        teacher_path, tmp))
        first.distributed, first.rank, first.world_size, first.local_rank = False, 0, 1, 0
        device = setup_device(first)
        rates = {'float32': matmul_tflops(device, torch.float32)}
        if first.amp:
            dtype = step_dtype(first.amp)
            rates[str(dtype).replace('torch.', '')] = matmul_tflops(device, dtype)
        if device.type == 'cuda':
            torch.cuda.empty_cache()  # the matmul's operands: leave the memory to the measuring processes
        switches = {'amp': first.amp, 'channels_last': first.channels_last, 'compile': first.compile,
                    'gpu_loader': first.gpu_loader}
        report = {
            'command': 'python scripts/benchmark.py ' + ' '.join(argv),
            'device': str(device),
            'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()
            or platform.machine(),
            'torch': torch.__version__, 'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
            'loadavg_start': list(os.getloadavg()), 'matmul_tflops': rates, 'switches': switches,
            'fold_teacher': first.fold_teacher,
            'results': [],
        }
        print('device {} ({}), {} threads, load average {:.2f}; matmul {}'.format(
            report['device'], report['device_name'], report['threads'], report['loadavg_start'][0],
            ', '.join('{} {:.3f} TFLOP/s'.format(k, v) for k, v in rates.items())))
        print('teacher {} -> student {}, {} warm-up + {} timed steps, switches: {}, fold_teacher={}'.format(
            args.model_t, args.model_s, args.warmup, args.steps,
            ', '.join('{}={}'.format(k, v) for k, v in switches.items()), first.fold_teacher))
        sys.stdout.flush()
        for method, batch_size in configs:
            argv_s = student_argv(args, passthrough, method, batch_size, teacher_path, tmp)
            if args.in_process:
                try:
                    result = measure(argv_s, args.warmup, args.steps, rates)
                except UserError as e:
                    result = {'error': 'error: {}'.format(e)}
            else:
                result = run_isolated(argv_s, args.warmup, args.steps, rates)
            row = {k: None for k in RESULT_FIELDS}
            row.update(method=method, model_t=args.model_t, model_s=args.model_s, batch_size=batch_size,
                       dataset=args.dataset, warmup=args.warmup, steps=args.steps, **switches)
            row.update(result)
            report['results'].append(row)
            print('{} batch {}: {}'.format(method, batch_size, row['error'] or '{:.1f} ms/step'.format(
                row['ms_per_step_median'])))
            sys.stdout.flush()
        report['loadavg_end'] = list(os.getloadavg())

    print()
    print(format_table(report['results']))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)
        print('wrote {}'.format(args.out))
    if any(r['error'] for r in report['results']):
        raise SystemExit(1)


if __name__ == '__main__':
    from helper.trainer import run_main
    run_main(main)
