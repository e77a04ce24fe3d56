"""Multi-process training with torch.distributed: one code path, two ways in.

* ``--multiprocessing-distributed`` (the reference's way): this script spawns one process
  per GPU named by ``--gpu_id`` (all visible GPUs by default), or ``--cpu_procs N`` gloo
  processes on a machine without GPUs, and they meet at ``--dist-url``.
* ``torchrun --nproc_per_node N [--nnodes/--node_rank/--master_addr] train_*.py ...``:
  the launcher sets RANK/WORLD_SIZE/LOCAL_RANK and we initialise from ``env://``; the process
  of local rank r takes the r-th GPU of ``--gpu_id`` (GPU r by default, the only one when a
  scheduler shows each task a single GPU).

NCCL on GPUs, gloo on CPUs. The global ``--batch_size`` is split across processes, as in
the reference. A process that fails takes the others down (mp.spawn / torchrun kill the
group), so nothing hangs in a collective; it reports its error with its rank first.
"""
import inspect
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from helper.errors import UserError

# BatchNorm statistics over fewer images than this per process are noisy enough to warn about
SMALL_BATCH = 16
# torch >= 2.14 deprecates broadcast_buffers (a FutureWarning per process) for forward_sync_buffers
_FORWARD_SYNC = 'forward_sync_buffers' in inspect.signature(DistributedDataParallel.__init__).parameters


def add_distributed_args(parser):
    g = parser.add_argument_group('distributed')
    g.add_argument('--multiprocessing-distributed', action='store_true',
                   help='spawn one process per GPU (or --cpu_procs on CPU) and train with DDP')
    g.add_argument('--dist-url', default='tcp://127.0.0.1:23451', type=str,
                   help='rendezvous address for --multiprocessing-distributed')
    g.add_argument('--cpu_procs', type=int, default=0,
                   help='with --multiprocessing-distributed and no GPU: number of gloo processes to spawn')
    g.add_argument('--sync_bn', action='store_true',
                   help='multi-GPU: BatchNorm statistics over the global batch (SyncBatchNorm in the student and the '
                        "method's adapters); needs GPUs (NCCL), ignored on CPU processes")
    return parser


def _under_torchrun():
    return 'LOCAL_RANK' in os.environ and 'WORLD_SIZE' in os.environ


def _parse_gpu_ids(gpu_id):
    try:
        return [int(i) for i in gpu_id.split(',') if i.strip()]
    except ValueError:
        raise UserError("--gpu_id must be comma-separated GPU numbers such as 0,1 (got '{}')".format(gpu_id))


def launch(worker, opt):
    """Run ``worker(opt)`` once per process; ``opt.rank``/``world_size``/``distributed`` are set."""
    if _under_torchrun():
        opt.distributed = True
        opt.rank, opt.world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        opt.local_rank = int(os.environ['LOCAL_RANK'])
        # torchrun starts the processes: --gpu_id maps local ranks to GPUs (CUDA_VISIBLE_DEVICES would come too late)
        opt.gpu_ids = _parse_gpu_ids(opt.gpu_id) if opt.gpu_id else None
        _run_process(worker, opt, 'env://')
    elif opt.multiprocessing_distributed:
        if opt.gpu_id is not None:
            os.environ['CUDA_VISIBLE_DEVICES'] = opt.gpu_id
        if opt.cpu_procs > 0:
            nprocs = opt.cpu_procs
        elif torch.cuda.is_available():
            nprocs = torch.cuda.device_count()
        else:
            raise UserError('--multiprocessing-distributed found no GPU; add --cpu_procs N to train with N CPU '
                            'processes')
        opt.distributed, opt.world_size, opt.gpu_ids = True, nprocs, None
        try:
            mp.spawn(_spawned, nprocs=nprocs, args=(worker, opt))
        except mp.ProcessExitedException as e:
            raise SystemExit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)
        except mp.ProcessRaisedException as e:
            print(str(e).strip().splitlines()[-1], file=sys.stderr)
            raise SystemExit(1)
    else:
        opt.distributed, opt.rank, opt.world_size, opt.local_rank = False, 0, 1, 0
        if getattr(opt, 'sync_bn', False):
            print('note: --sync_bn applies to multi-process runs; ignored in a single process')
            opt.sync_bn = False
        worker(opt)


def _spawned(local_rank, worker, opt):
    opt.rank = opt.local_rank = local_rank
    _run_process(worker, opt, opt.dist_url)


def local_cuda_index(local_rank, device_count, gpu_ids=None):
    """The GPU (an index among the ``device_count`` visible ones) of the process with ``local_rank`` on its node.

    ``gpu_ids`` (torchrun with ``--gpu_id``) lists the node's GPUs in local-rank order. Without it the process
    of local rank r takes GPU r, and a process that sees one GPU only (a scheduler's one GPU per task) takes it.
    """
    if gpu_ids:
        if local_rank >= len(gpu_ids):
            raise UserError('--gpu_id {} names {} GPU(s) but this node runs a process of local rank {}: name one GPU '
                            'per process'.format(','.join(map(str, gpu_ids)), len(gpu_ids), local_rank))
        if gpu_ids[local_rank] >= device_count:
            raise UserError('--gpu_id names GPU {} but this process sees {} GPU(s); name visible GPUs'
                            .format(gpu_ids[local_rank], device_count))
        return gpu_ids[local_rank]
    if device_count == 1:
        return 0
    if local_rank >= device_count:
        raise UserError('this node runs a process of local rank {} but has {} GPUs; start at most one process per '
                        'GPU'.format(local_rank, device_count))
    return local_rank


def process_device(opt, device_count=None):
    """This process's device: a GPU (see ``local_cuda_index``), or the CPU for ``--cpu_procs`` or without GPUs."""
    if device_count is None:
        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device_count == 0 or getattr(opt, 'cpu_procs', 0) > 0:
        return torch.device('cpu')
    return torch.device('cuda', local_cuda_index(opt.local_rank, device_count, getattr(opt, 'gpu_ids', None)))


def init_args(device):
    """Backend and device of ``init_process_group``: NCCL bound to this process's GPU, or gloo on the CPU."""
    if device.type == 'cuda':
        return {'backend': 'nccl', 'device_id': device}
    return {'backend': 'gloo'}


def shared_seed(seed, device):
    """``seed``, or when it is None one drawn on rank 0 and sent to all: every process must shuffle alike."""
    if seed is not None:
        return int(seed)
    value = torch.randint(0, 2 ** 31 - 1, (), dtype=torch.long, device=device)
    dist.broadcast(value, src=0)
    return int(value)


def error_line(err, rank):
    return 'error{}: {}'.format(' (rank {})'.format(rank) if rank else '', err)


def _run_process(worker, opt, init_method):
    try:
        device = process_device(opt)
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group(init_method=init_method, world_size=opt.world_size, rank=opt.rank,
                                **init_args(device))
        opt.device = str(device)
        # without --seed the data order's seed comes from rank 0, so the shards of an epoch are disjoint
        opt.data_seed = shared_seed(opt.seed, device)
        # the reference splits the global batch and the workers across processes
        opt.batch_size = opt.batch_size // opt.world_size
        if opt.batch_size < 1:
            raise UserError('--batch_size is smaller than the number of processes ({})'.format(opt.world_size))
        opt.num_workers = (opt.num_workers + opt.world_size - 1) // opt.world_size
        opt.sync_bn = use_sync_bn(opt, device)
        worker(opt)
    except UserError as e:
        # every process says what stopped it: the one that failed need not be rank 0
        print(error_line(e, opt.rank), file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)  # skip teardown collectives that would wait for the other processes
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def use_sync_bn(opt, device):
    """Whether ``--sync_bn`` applies (GPU processes only); rank 0 says why not and warns about small batches."""
    asked = getattr(opt, 'sync_bn', False)
    main = getattr(opt, 'rank', 0) == 0
    if asked and device.type != 'cuda':
        if main:
            print('note: --sync_bn needs GPUs (NCCL); ignored on CPU processes')
        asked = False
    if opt.batch_size < SMALL_BATCH and main:
        print('warning: {} images per process and step: {}batch-wise losses (e.g. SemCKD, SP) see only these; '
              'a larger --batch_size helps'.format(opt.batch_size, '' if asked else
                                                   'BatchNorm statistics (add --sync_bn on GPUs) and '))
    return asked


def wrap_ddp(module, device, broadcast_buffers=True, sync_bn=False):
    """DDP for a module that has trainable parameters (frozen ones are left as they are).

    Every process starts from rank 0's parameters and buffers. ``broadcast_buffers=False`` lets
    the buffers evolve per process after that (CRD's memory banks, which each process updates
    with the whole global batch itself). ``sync_bn``: BatchNorm layers become SyncBatchNorm
    (statistics over the global batch; GPUs only), in place, so the optimiser's parameters stay.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module
    if sync_bn:
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    device_ids = [device.index] if device.type == 'cuda' else None
    if _FORWARD_SYNC:
        # syncs the buffers at construction whatever the value
        return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=broadcast_buffers)
    wrapped = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=broadcast_buffers)
    if not broadcast_buffers:  # older torch skips the initial sync too
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
    return wrapped
