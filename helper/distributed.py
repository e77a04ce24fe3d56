"""Multi-process training with torch.distributed: one code path, two ways in.

* ``--multiprocessing-distributed`` (the reference's way): this script spawns one process
  per GPU named by ``--gpu_id`` (all visible GPUs by default), or ``--cpu_procs N`` gloo
  processes on a machine without GPUs, and they meet at ``--dist-url``.
* ``torchrun --nproc_per_node N [--nnodes/--node_rank/--master_addr] train_*.py ...``:
  the launcher sets RANK/WORLD_SIZE/LOCAL_RANK and we initialise from ``env://``.

NCCL on GPUs, gloo on CPUs. The global ``--batch_size`` is split across processes, as in
the reference. A process that fails takes the others down (mp.spawn / torchrun kill the
group), so nothing hangs in a collective.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helper.errors import UserError


def add_distributed_args(parser):
    g = parser.add_argument_group('distributed')
    g.add_argument('--multiprocessing-distributed', action='store_true',
                   help='spawn one process per GPU (or --cpu_procs on CPU) and train with DDP')
    g.add_argument('--dist-url', default='tcp://127.0.0.1:23451', type=str,
                   help='rendezvous address for --multiprocessing-distributed')
    g.add_argument('--cpu_procs', type=int, default=0,
                   help='with --multiprocessing-distributed and no GPU: number of gloo processes to spawn')
    return parser


def _under_torchrun():
    return 'LOCAL_RANK' in os.environ and 'WORLD_SIZE' in os.environ


def launch(worker, opt):
    """Run ``worker(opt)`` once per process; ``opt.rank``/``world_size``/``distributed`` are set."""
    if _under_torchrun():
        opt.distributed = True
        opt.rank, opt.world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        opt.local_rank = int(os.environ['LOCAL_RANK'])
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
        opt.distributed, opt.world_size = True, nprocs
        try:
            mp.spawn(_spawned, nprocs=nprocs, args=(worker, opt))
        except mp.ProcessExitedException as e:
            raise SystemExit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)
        except mp.ProcessRaisedException as e:
            print(str(e).strip().splitlines()[-1], file=sys.stderr)
            raise SystemExit(1)
    else:
        opt.distributed, opt.rank, opt.world_size, opt.local_rank = False, 0, 1, 0
        worker(opt)


def _spawned(local_rank, worker, opt):
    opt.rank = opt.local_rank = local_rank
    _run_process(worker, opt, opt.dist_url)


def _run_process(worker, opt, init_method):
    use_cuda = torch.cuda.is_available() and opt.cpu_procs == 0
    if use_cuda:
        torch.cuda.set_device(opt.local_rank)
    backend = 'nccl' if use_cuda else 'gloo'
    dist.init_process_group(backend=backend, init_method=init_method, world_size=opt.world_size, rank=opt.rank)
    # the reference splits the global batch and the workers across processes
    opt.batch_size = opt.batch_size // opt.world_size
    if opt.batch_size < 1:
        raise UserError('--batch_size is smaller than the number of processes ({})'.format(opt.world_size))
    opt.num_workers = (opt.num_workers + opt.world_size - 1) // opt.world_size
    try:
        worker(opt)
    except UserError as e:
        if opt.rank == 0:
            print('error: {}'.format(e), file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)  # skip teardown collectives that would wait for the other processes
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_ddp(module, device, broadcast_buffers=True):
    """DDP for a module that has trainable parameters (frozen ones are left as they are)."""
    if not (dist.is_available() and dist.is_initialized()):
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module
    device_ids = [device.index] if device.type == 'cuda' else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                     broadcast_buffers=broadcast_buffers)
