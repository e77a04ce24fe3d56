"""Distil a teacher into a student with any method of the zoo.

    python train_student.py --path-t ./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth \
        --distill semckd --model_s resnet8x4 -r 1 -a 1 -b 400 --trial 0

loss = gamma * CE(student, y) + alpha * KL_T(student, teacher) + beta * <method's loss>.
The teacher's architecture is read from its folder name (or --model_t). Outputs go to
save/student_model/S:{model_s}_T:{model_t}_{dataset}_{distill}_r:{gamma}_a:{alpha}_b:{beta}_{trial}/.
"""
import argparse
import os

import torch
import torch.optim as optim

from dataset import test_set_identity
from helper.errors import UserError
from helper.loops import DistillObjective, InitObjective, validate
from helper.options import add_common_args, finish_common
from helper.teacher import ACCURACY_FILE, SPLIT, get_teacher_name, load_teacher, teacher_accuracy
from helper.distributed import launch, wrap_ddp
from helper.fold_bn import FoldError, frozen_teacher, scripted_teacher
from helper.trainer import Trainer, is_main, log_main, prepare_save_folder, run_main, setup_device

# the run folder of a run with --logit_stand ends with this (scripts/summarize.py reads it)
LOGIT_STAND_SUFFIX = '_ls'


def parse_option(argv=None):
    from distiller_zoo import DISTILLERS
    from models import model_dict

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group('models')
    g.add_argument('--model_s', type=str, default='resnet8', help='student architecture')
    g.add_argument('--path-t', type=str, default=None, help='teacher checkpoint ({"model": state_dict})')
    g.add_argument('--model_t', type=str, default=None, help="teacher architecture (default: from its folder name)")

    g = parser.add_argument_group('distillation')
    g.add_argument('--distill', type=str, default='kd', help='method: ' + ', '.join(sorted(DISTILLERS)))
    g.add_argument('-r', '--gamma', type=float, default=1.0, help='weight of the classification loss')
    g.add_argument('-a', '--alpha', type=float, default=1.0, help='weight of the KD (KL) loss')
    g.add_argument('-b', '--beta', type=float, default=0.0, help="weight of the method's own loss")
    g.add_argument('--kd_T', type=float, default=4, help='temperature of the KD loss')
    g.add_argument('--skip-validation', action='store_true', help="don't evaluate the teacher before training")
    g.add_argument('--revalidate_teacher', action='store_true',
                   help='evaluate the teacher even if an earlier run evaluated this checkpoint on this test set '
                        '(its accuracy is kept in <save_root>/%s)' % ACCURACY_FILE.replace('%', '%%'))
    g.add_argument('--init_epochs', type=int, default=30,
                   help='epochs of the init stage of the methods that have one (RepDistiller: 30)')
    for cls in DISTILLERS.values():
        cls.add_arguments(parser.add_argument_group(cls.display_name or cls.name))
    add_common_args(parser)
    opt = parser.parse_args(argv)

    if opt.model_s not in model_dict:
        raise UserError("unknown --model_s '{}'; valid names: {}".format(opt.model_s, ', '.join(sorted(model_dict))))
    if opt.distill not in DISTILLERS:
        raise UserError("unknown --distill '{}'; valid methods: {}".format(opt.distill, ', '.join(sorted(DISTILLERS))))
    if opt.init_epochs < 0:
        raise UserError('--init_epochs must be 0 or more (got {})'.format(opt.init_epochs))
    if opt.path_t is None:
        raise UserError('--path-t is required: the teacher checkpoint, e.g. '
                        './save/models/resnet32x4_vanilla/ckpt_epoch_240.pth')
    if not os.path.isfile(opt.path_t):
        raise UserError("teacher file '{}' does not exist; train one with train_teacher.py or run "
                        "scripts/fetch_pretrained_teachers.sh".format(opt.path_t))
    if opt.model_t is None:
        opt.model_t = get_teacher_name(opt.path_t, model_dict)
    elif opt.model_t not in model_dict:
        raise UserError("unknown --model_t '{}'; valid names: {}".format(opt.model_t, ', '.join(sorted(model_dict))))
    finish_common(opt, opt.model_s)

    opt.model_name = SPLIT.join(['S', '{}_T', '{}_{}_{}_r', '{}_a', '{}_b', '{}_{}']).format(
        opt.model_s, opt.model_t, opt.dataset, opt.distill, opt.gamma, opt.alpha, opt.beta, opt.trial)
    if getattr(opt, 'logit_stand', False):
        # a run with logit standardisation is another experiment: its own folder, never the plain run's
        opt.model_name += LOGIT_STAND_SUFFIX
    opt.save_folder = os.path.join(opt.save_root, 'student_model', opt.model_name)
    return opt


def main(argv=None):
    launch(worker, parse_option(argv))


def worker(opt):
    device = setup_device(opt)
    trainer = build_trainer(opt, device)
    log = log_main(opt)
    if opt.resume:
        trainer.resume(opt.resume)
    # every input is checked by now: only a valid run creates or touches its folder
    if is_main(opt):
        prepare_save_folder(opt.save_folder)
    if not opt.skip_validation:
        teacher_accuracy(opt, lambda: validate(trainer.val_loader, trainer.objective.model_t, opt, device),
                         test_set_identity(getattr(trainer.val_loader, 'dataset', None)), device, log)
    else:
        log('skipping teacher validation')
    if is_main(opt):
        trainer.write_parameters()
    trainer.fit()


def build_trainer(opt, device):
    """Teacher, student, method, data, optimiser: everything of a run but its loop."""
    from dataset import NUM_CLASSES, get_dataloaders, image_size
    from distiller_zoo import DISTILLERS, StudentPredictor, build_distiller
    from distiller_zoo.registry import preact_modes
    from models import build_model

    log = log_main(opt)
    n_cls = NUM_CLASSES[opt.dataset]
    method = DISTILLERS[opt.distill]

    model_t = load_teacher(opt.path_t, opt.model_t, n_cls, opt.dataset)
    model_s = build_model(opt.model_s, n_cls, dataset=opt.dataset)
    train_loader, val_loader, train_sampler, n_data = get_dataloaders(
        opt, data_mode=method.data_mode, drop_last=method.drop_last, extra_views=method.extra_views,
        view_transform=method.view_transform(opt.dataset) if method.extra_views else None)
    opt.n_data = n_data

    # one probe forward tells the method the feature shapes it adapts between
    size = image_size(opt.dataset)
    probe = torch.randn(2, 3, size, size)
    model_s.eval()
    model_t.eval()
    preact_s, preact_t = preact_modes(method)
    with torch.no_grad():
        feat_s, _ = model_s(probe, is_feat=True, preact=preact_s)
        feat_t, _ = model_t(probe, is_feat=True, preact=preact_t)
    distiller = build_distiller(opt.distill, feat_s, feat_t, opt, model_s=model_s, model_t=model_t)

    model_t.requires_grad_(False)
    # the forward pass runs a copy with the BatchNorms folded in; the distiller got the original. Not
    # where the method needs the teacher as it is: in train mode (batch statistics), or with hooks it
    # registered on the teacher's modules (a copy would not call them)
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in model_t.modules())
    teacher = frozen_teacher(model_t, probe[:1], opt.fold_teacher and not method.teacher_train_mode and not hooked, log)
    model_t, teacher, model_s, distiller = (m.to(device) for m in (model_t, teacher, model_s, distiller))
    if opt.channels_last:
        for m in (model_t, teacher, model_s, distiller):
            m.to(memory_format=torch.channels_last)
    opt.teacher_form = 'folded' if teacher is not model_t else 'as is'
    # on the CPU a frozen oneDNN graph of the folded teacher is faster still (not under autocast, which
    # it would not follow; --compile compiles the teacher instead)
    if teacher is not model_t and device.type == 'cpu' and not opt.amp and not opt.compile:
        # its own generator: the run's random stream must not depend on the teacher's form
        images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
        if opt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        try:
            teacher = scripted_teacher(teacher, images, preact_t)
            opt.teacher_form = 'folded, TorchScript'
            log('==> teacher: runs as a frozen TorchScript graph for oneDNN (--no_fold_teacher: as loaded)')
        except FoldError as e:
            log('==> the folded teacher runs eagerly: {}'.format(e))
    log('==> teacher {} from {}; student {}; method {}; {} on {}'.format(
        opt.model_t, opt.path_t, opt.model_s, opt.distill, opt.dataset, device))
    # fused on a GPU: one kernel, and with fp16 the scaler's overflow check stays on the device
    fused = device.type == 'cuda'
    optimizer = optim.SGD(trainable(model_s, distiller), lr=opt.learning_rate,
                          momentum=opt.momentum, weight_decay=opt.weight_decay, fused=fused)
    # a resumed state from another device must not switch that back (the scaler relies on it)
    optimizer.register_load_state_dict_post_hook(
        lambda o: [g.update(fused=fused, foreach=None) for g in o.param_groups])
    # the frozen teacher stays unwrapped; the memory banks of CRD start as rank 0's, then each process
    # updates its own with the global batch
    sync_bn = getattr(opt, 'sync_bn', False)
    train_s = wrap_ddp(model_s, device, sync_bn=sync_bn)
    train_d = wrap_ddp(distiller, device, broadcast_buffers=False, sync_bn=sync_bn)
    if opt.compile:
        # an eval-mode teacher's weights never change: inductor may freeze them into its graph as
        # constants (on the CPU it then prepacks them for oneDNN and fuses each conv with the add and
        # ReLU after it). A train-mode teacher updates its BN statistics, so it is compiled as it is.
        freeze = {'freezing': True} if not method.teacher_train_mode else None
        train_s, train_d = torch.compile(train_s), torch.compile(train_d)
        teacher = torch.compile(teacher, options=freeze)
    objective = DistillObjective(train_s, teacher, train_d, opt)
    eval_model = StudentPredictor(train_s, distiller) if method.changes_prediction else train_s
    scaler = torch.amp.GradScaler(device.type) if opt.amp == 'fp16' else None

    init = None
    stage = distiller.init_stage(opt)
    if stage is not None and stage.epochs > 0:
        # RepDistiller's helper/pretrain.py: SGD over the stage's modules at its constant learning rate
        init_optimizer = optim.SGD(trainable(*stage.modules_to_train), lr=stage.lr, momentum=opt.momentum,
                                   weight_decay=opt.weight_decay)
        init = (stage.epochs, InitObjective(objective, stage), init_optimizer)
        log('==> init stage: {} epochs, lr {:g}'.format(stage.epochs, stage.lr))
    return Trainer(opt, objective, {'model': model_s, 'distiller': distiller}, eval_model, optimizer,
                   train_loader, val_loader, device, train_sampler=train_sampler, file_prefix=opt.model_s,
                   extra_state={'arch': opt.model_s, 'distill': opt.distill, 'teacher': opt.model_t,
                                'dataset': opt.dataset}, scaler=scaler, init=init)


def trainable(*modules):
    """The parameters of ``modules`` that require a gradient, each once, in order."""
    params, seen = [], set()
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


if __name__ == '__main__':
    run_main(main)
