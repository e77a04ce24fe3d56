"""Run under torchrun (2 CPU processes): one distilled training step, then report what each replica holds.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/ddp_check.py OUT_DIR <train_student.py flags>
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_student  # noqa: E402
from helper.distributed import launch  # noqa: E402
from helper.loops import to_batch, train_step, unwrap, validate  # noqa: E402
from helper.trainer import setup_device  # noqa: E402


def flat(module):
    # parameters only: BN running statistics are per-process until DDP broadcasts rank 0's at the next forward
    return torch.cat([p.detach().reshape(-1) for p in unwrap(module).parameters()] + [torch.zeros(0)])


def worker(opt):
    out = opt.out_dir
    device = setup_device(opt)
    trainer = train_student.build_trainer(opt, device)
    trainer.train_sampler.set_epoch(1)
    x, batch = to_batch(next(iter(trainer.train_loader)), device)
    trainer.objective.train()
    train_step(trainer.objective, trainer.optimizer, x, batch, opt, device)
    student = trainer.modules['model']
    mine = torch.cat([flat(student), flat(trainer.modules['distiller'])])
    gathered = [torch.zeros_like(mine) for _ in range(opt.world_size)]
    dist.all_gather(gathered, mine)
    # through the DDP wrapper, as the trainer does: its first forward hands rank 0's BN statistics to all
    acc1, acc5, loss = validate(trainer.val_loader, trainer.eval_model, opt, device)
    buffers = torch.cat([b.reshape(-1).float() for name, b in unwrap(trainer.modules['distiller']).named_buffers()
                         if 'memory' in name or name.endswith('Z_v1') or name.endswith('Z_v2')] + [torch.zeros(0)])
    all_buffers = [torch.zeros_like(buffers) for _ in range(opt.world_size)]
    dist.all_gather(all_buffers, buffers)
    if opt.rank == 0:
        torch.save({'buffers': all_buffers, 'student': unwrap(student).state_dict(), 'replicas': gathered, 'acc': (acc1, acc5, loss),
                    'world_size': opt.world_size, 'batch_size': opt.batch_size},
                   os.path.join(out, 'ddp_check.pth'))


if __name__ == '__main__':
    out_dir = sys.argv[1]
    opt = train_student.parse_option(sys.argv[2:])
    opt.out_dir = out_dir
    launch(worker, opt)
