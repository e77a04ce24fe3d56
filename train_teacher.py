"""Train a network with cross-entropy: a teacher, or a baseline student.

    python train_teacher.py --model resnet32x4
    python train_teacher.py --model resnet8 --dataset synthetic --epochs 3    # offline quick start

Outputs go to save/models/{model}_{dataset}_lr_{lr}_decay_{wd}_trial_{trial}/.
"""
import argparse
import os

import torch
import torch.optim as optim

from helper.errors import UserError
from helper.loops import ClassifierObjective
from helper.options import add_common_args, finish_common
from helper.distributed import launch, wrap_ddp
from helper.trainer import Trainer, is_main, log_main, prepare_save_folder, run_main, setup_device


def parse_option(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', type=str, default='resnet110', help='architecture (a models.model_dict name)')
    add_common_args(parser)
    parser.set_defaults(print_freq=100)
    opt = parser.parse_args(argv)
    from models import model_dict
    if opt.model not in model_dict:
        raise UserError("unknown --model '{}'; valid names: {}".format(opt.model, ', '.join(sorted(model_dict))))
    finish_common(opt, opt.model)
    opt.model_name = '{}_{}_lr_{}_decay_{}_trial_{}'.format(opt.model, opt.dataset, opt.learning_rate,
                                                            opt.weight_decay, opt.trial)
    opt.save_folder = os.path.join(opt.save_root, 'models', opt.model_name)
    return opt


def main(argv=None):
    launch(worker, parse_option(argv))


def worker(opt):
    from dataset import NUM_CLASSES, get_dataloaders
    from models import build_model

    device = setup_device(opt)
    log = log_main(opt)
    train_loader, val_loader, train_sampler, opt.n_data = get_dataloaders(opt)
    model = build_model(opt.model, NUM_CLASSES[opt.dataset], dataset=opt.dataset).to(device)
    if opt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optim.SGD(model.parameters(), lr=opt.learning_rate, momentum=opt.momentum,
                          weight_decay=opt.weight_decay)
    train_model = wrap_ddp(model, device, sync_bn=getattr(opt, 'sync_bn', False))
    train_model = torch.compile(train_model) if opt.compile else train_model
    scaler = torch.amp.GradScaler(device.type) if opt.amp == 'fp16' else None
    trainer = Trainer(opt, ClassifierObjective(train_model), {'model': model}, train_model, optimizer,
                      train_loader, val_loader, device, train_sampler=train_sampler, file_prefix=opt.model,
                      extra_state={'arch': opt.model, 'dataset': opt.dataset}, scaler=scaler)
    if opt.resume:
        trainer.resume(opt.resume)
    # every input is checked by now: only a valid run creates or touches its folder
    if is_main(opt):
        prepare_save_folder(opt.save_folder)
    log('==> training {} on {} ({} train images) on {}; outputs in {}'.format(
        opt.model, opt.dataset, opt.n_data, device, opt.save_folder))
    if is_main(opt):
        trainer.write_parameters()
    trainer.fit()


if __name__ == '__main__':
    run_main(main)
