"""Command-line flags shared by train_teacher.py and train_student.py (reference names/defaults)."""
import argparse
import importlib.util
import os
import sys

from helper.errors import UserError

# students that the reference trains with lr 0.01 instead of 0.05
LOW_LR_MODELS = ('MobileNetV2', 'ShuffleV1', 'ShuffleV2')


def add_common_args(parser):
    g = parser.add_argument_group('run')
    g.add_argument('--print-freq', type=int, default=200, help='print a progress line every N steps')
    g.add_argument('--save_freq', type=int, default=40, help='also keep ckpt_epoch_N.pth every N epochs')
    g.add_argument('--batch_size', type=int, default=64, help='global batch size (split across processes)')
    g.add_argument('--num_workers', type=int, default=8, help='data-loading worker processes')
    g.add_argument('--epochs', type=int, default=240, help='number of training epochs')
    g.add_argument('--gpu_id', type=str, default=None,
                   help='GPU id(s), e.g. 0 or 0,1,2,3 (sets CUDA_VISIBLE_DEVICES); default: GPU 0 if any, else CPU')
    g.add_argument('--trial', '-t', type=str, default='0', help='experiment id, part of the run folder name')
    g.add_argument('--save_root', type=str, default='./save', help='where run folders are created')
    g.add_argument('--seed', type=int, default=None, help='random seed (default: 12345 with --deterministic)')
    g.add_argument('--deterministic', action='store_true',
                   help='seed everything and use deterministic kernels (slower; disables cudnn.benchmark)')
    g.add_argument('--resume', type=str, default=None,
                   help="continue a run: path of a *_last.pth, or 'auto' for this run folder's last checkpoint")

    g = parser.add_argument_group('optimisation')
    g.add_argument('--learning_rate', type=float, default=None,
                   help='SGD learning rate (default 0.05; 0.01 for MobileNetV2/ShuffleV1/ShuffleV2)')
    g.add_argument('--lr_decay_epochs', type=str, default='150,180,210',
                   help='comma-separated epochs after which the learning rate is decayed')
    g.add_argument('--lr_decay_rate', type=float, default=0.1, help='learning-rate decay factor')
    g.add_argument('--weight_decay', type=float, default=5e-4, help='weight decay')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--nan-policy', dest='nan_policy', choices=['stop', 'skip'], default='stop',
                   help='on a NaN/inf loss: stop with a message, or skip the step (stops after 20 skips)')

    g = parser.add_argument_group('data')
    g.add_argument('--dataset', type=str, default='cifar100',
                   choices=['cifar100', 'imagenet', 'imagenette', 'synthetic'],
                   help='synthetic: a CIFAR-shaped learnable set generated on the fly (no download)')
    g.add_argument('--data_folder', type=str, default='./data', help='where the data set lives')
    g.add_argument('--gpu_loader', action='store_true',
                   help='CIFAR/synthetic: keep the training set on the device and augment there (no workers)')
    g.add_argument('--dali', type=str, choices=['cpu', 'gpu'], default=None,
                   help='ImageNet: decode and augment with NVIDIA DALI (pip install nvidia-dali-cuda120 or -cuda130)')
    g.add_argument('--synthetic_train_size', type=int, default=5000, help=argparse.SUPPRESS)
    g.add_argument('--synthetic_val_size', type=int, default=1000, help=argparse.SUPPRESS)

    g = parser.add_argument_group('logging')
    g.add_argument('--wandb', action='store_true',
                   help='also log each epoch to Weights & Biases (pip install wandb); TensorBoard always logs')
    g.add_argument('--wandb_project', type=str, default=None, help='W&B project (default: kd-<dataset>)')
    g.add_argument('--wandb_entity', type=str, default=None, help='W&B entity (default: your default entity)')
    g.add_argument('--wandb_mode', choices=['online', 'offline'], default=None,
                   help="W&B mode (default: wandb's own, e.g. $WANDB_MODE); offline runs sync later with wandb sync")

    g = parser.add_argument_group('speed')
    g.add_argument('--amp', choices=['bf16', 'fp16'], default=None, help='autocast mixed precision')
    g.add_argument('--channels_last', nargs='?', choices=['auto', 'on', 'off'], default='auto', const='on',
                   help="NHWC memory format for the models, the method's modules and the inputs; auto (default): "
                        'on on the CPU, where it measures faster, off on a GPU unless --amp')
    g.add_argument('--compile', action='store_true',
                   help="torch.compile the trained model (and, distilling, the frozen teacher and the method's "
                        'modules)')
    g.add_argument('--no_fold_teacher', dest='fold_teacher', action='store_false',
                   help='train_student.py: run the frozen teacher as it is, not with its BatchNorms folded into '
                        'its convolutions (and on the CPU as a frozen TorchScript graph)')
    from helper.distributed import add_distributed_args
    add_distributed_args(parser)
    return parser


def finish_common(opt, model_name_for_lr):
    """Validate and normalise the shared flags; raises UserError with a one-line fix."""
    if opt.batch_size <= 0:
        raise UserError('--batch_size must be a positive integer (got {})'.format(opt.batch_size))
    if opt.epochs <= 0:
        raise UserError('--epochs must be a positive integer (got {})'.format(opt.epochs))
    if opt.print_freq <= 0:
        raise UserError('--print-freq must be a positive integer (got {})'.format(opt.print_freq))
    try:
        decay = [int(e) for e in opt.lr_decay_epochs.split(',') if e.strip()] if isinstance(
            opt.lr_decay_epochs, str) else list(opt.lr_decay_epochs)
    except ValueError:
        raise UserError("--lr_decay_epochs must be comma-separated integers such as 150,180,210 (got '{}')"
                        .format(opt.lr_decay_epochs))
    if any(b <= a for a, b in zip(decay, decay[1:])) or any(e <= 0 for e in decay):
        raise UserError('--lr_decay_epochs must be positive and strictly increasing (got {})'
                        .format(opt.lr_decay_epochs))
    opt.lr_decay_epochs = decay
    if opt.learning_rate is None:
        opt.learning_rate = 0.01 if model_name_for_lr in LOW_LR_MODELS else 0.05
    if not opt.learning_rate > 0:
        raise UserError('--learning_rate must be positive (got {})'.format(opt.learning_rate))
    if opt.seed is None and opt.deterministic:
        opt.seed = 12345
    opt.num_workers = max(0, min(opt.num_workers, os.cpu_count() or 1))
    if getattr(opt, 'wandb', False) and 'wandb' not in sys.modules and importlib.util.find_spec('wandb') is None:
        raise UserError('--wandb needs the wandb package: pip install wandb (or drop --wandb)')
    opt.channels_last = use_channels_last(opt.channels_last, opt)
    return opt


def use_channels_last(choice, opt):
    """Resolve --channels_last auto|on|off (or a bool) to a bool, the value parameters.json records."""
    if isinstance(choice, bool):
        return choice
    if choice != 'auto':
        return choice == 'on'
    import torch
    on_gpu = torch.cuda.is_available() and getattr(opt, 'cpu_procs', 0) == 0
    # CPU: NHWC convolutions measured faster (README, Performance); GPU: tensor cores prefer NHWC, which
    # only AMP uses (fp32 convolutions are left as they are)
    return not on_gpu or getattr(opt, 'amp', None) is not None
