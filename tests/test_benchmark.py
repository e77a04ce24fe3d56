"""scripts/benchmark.py through its command line, on tiny configurations."""
import json
import os

from conftest import run_script

FIELDS = ['method', 'model_t', 'model_s', 'batch_size', 'dataset', 'amp', 'channels_last', 'compile', 'gpu_loader',
          'num_workers', 'warmup', 'steps', 'ms_per_step_median', 'ms_per_step_min', 'ms_per_step_max',
          'ms_per_step_p25', 'ms_per_step_p75', 'images_per_s', 'data_ms_median', 'data_share', 'flops_per_step',
          'flops_teacher_forward', 'flops_student_and_adapters', 'achieved_tflops', 'matmul_fraction',
          'peak_memory_mb', 'peak_memory_kind', 'params_student_M', 'params_adapters_M', 'teacher_form', 'device',
          'error']
TINY = ['--model_t', 'resnet8', '--model_s', 'resnet8', '--batch_size', '8', '--warmup', '2', '--steps', '3',
        '--synthetic_train_size', '64', '--synthetic_val_size', '16', '--num_workers', '0']


def bench(args, cwd):
    return run_script(os.path.join('scripts', 'benchmark.py'), args, cwd, timeout=300, check=False)


def check_row(row, batch_size):
    assert sorted(row) == sorted(FIELDS)
    assert row['error'] is None and row['batch_size'] == batch_size and row['steps'] == 3
    assert 0 < row['ms_per_step_min'] <= row['ms_per_step_p25'] <= row['ms_per_step_median'] \
        <= row['ms_per_step_p75'] <= row['ms_per_step_max']
    assert abs(row['images_per_s'] - batch_size * 1000.0 / row['ms_per_step_median']) < 1e-6 * row['images_per_s']
    assert 0 < row['data_ms_median'] < row['ms_per_step_median'] and 0 < row['data_share'] < 1
    assert row['flops_per_step'] == row['flops_teacher_forward'] + row['flops_student_and_adapters']
    # forward + backward of the student cost about twice its forward more; the teacher (same net) only forward
    assert row['flops_student_and_adapters'] > 2 * row['flops_teacher_forward'] > 0
    assert row['achieved_tflops'] > 0 and 0 < row['matmul_fraction']
    assert row['peak_memory_mb'] > 50 and row['peak_memory_kind'] == 'max_rss' and row['device'] == 'cpu'


def test_benchmark_kd_and_semckd(tmp_path):
    out = tmp_path / 'bench.json'
    proc = bench(TINY + ['--distill', 'kd', 'semckd', '--out', str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report['device'] == 'cpu' and report['matmul_tflops']['float32'] > 0
    assert len(report['loadavg_start']) == 3 and len(report['loadavg_end']) == 3
    kd, semckd = report['results']
    assert (kd['method'], semckd['method']) == ('kd', 'semckd')
    for row in (kd, semckd):
        check_row(row, 8)
    assert kd['params_adapters_M'] == 0 and semckd['params_adapters_M'] > 0
    # SemCKD's adapters add work; the teacher's forward is the same
    assert semckd['flops_per_step'] > kd['flops_per_step']
    assert semckd['flops_teacher_forward'] == kd['flops_teacher_forward']
    # the table: a header and one line per method, with its median
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if 'ms/step' in line and 'img/s' in line)
    for line, row in zip(lines[header + 1:header + 3], (kd, semckd)):
        cells = line.split()
        assert cells[:3] == [row['method'], '8', '{:.1f}'.format(row['ms_per_step_median'])]


def test_benchmark_crd_with_the_gpu_loader_in_process(tmp_path):
    out = tmp_path / 'bench.json'
    proc = bench(TINY + ['--distill', 'crd', '--gpu_loader', '--nce_k', '16', '--in_process', '--out', str(out)],
                 tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    (row,) = report['results']
    check_row(row, 8)
    assert row['method'] == 'crd' and row['gpu_loader'] is True and report['switches']['gpu_loader'] is True


def test_benchmark_rejects_an_unknown_method(tmp_path):
    proc = bench(TINY + ['--distill', 'kd', 'nosuch'], tmp_path)
    assert proc.returncode == 2
    assert 'nosuch' in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
