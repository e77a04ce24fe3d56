"""What both entry scripts share: device set-up, the epoch loop, checkpoints and resume."""
import ctypes
import ctypes.util
import json
import os
import sys
import time

import torch

from helper.errors import UserError
from helper.loops import train_epoch, unwrap, validate
from helper.runlog import RunLog
from helper.util import (adjust_learning_rate, rng_state, save_checkpoint, save_dict_to_json, set_rng_state,
                         set_seed)


def keep_freed_memory():
    """Let glibc's malloc serve every allocation under 32 MB from memory the process keeps.

    By default a large block (an activation, a gradient) is a fresh mmap and goes back to the
    kernel when freed, so every training step on the CPU page-faults its activations in again
    (measured: 3x the page faults, twice the system time, 4-6% of a resnet32x4 -> resnet8x4 KD
    step). Elsewhere than glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def setup_device(opt):
    """The process's device (its GPU, or the CPU when there is none); seeds the RNGs.

    With ``--seed`` process r is seeded with seed + r: data-loader workers, augmentation and
    sampling then differ across processes (DDP gives all of them rank 0's initial weights).
    """
    distributed = getattr(opt, 'distributed', False)
    if opt.gpu_id is not None and not distributed:
        os.environ['CUDA_VISIBLE_DEVICES'] = opt.gpu_id
        ids = [i for i in opt.gpu_id.split(',') if i.strip()]
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(ids):
            raise UserError('--gpu_id {} names a GPU that is not there ({} visible); drop --gpu_id to run on the '
                            'CPU or name an existing GPU'.format(opt.gpu_id, torch.cuda.device_count()
                                                                 if torch.cuda.is_available() else 0))
        if len(ids) > 1:
            raise UserError('--gpu_id {} names several GPUs; add --multiprocessing-distributed to train on all of '
                            'them, or name one GPU'.format(opt.gpu_id))
    if distributed and getattr(opt, 'device', None) is not None:
        device = torch.device(opt.device)  # chosen by helper.distributed before the process group started
    elif torch.cuda.is_available() and getattr(opt, 'cpu_procs', 0) == 0:
        device = torch.device('cuda', 0)
    else:
        device = torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not opt.deterministic
    else:
        keep_freed_memory()
    opt.device = str(device)
    if opt.seed is not None:
        set_seed(opt.seed + getattr(opt, 'rank', 0), opt.deterministic)
    return device


def is_main(opt):
    return getattr(opt, 'rank', 0) == 0


def log_main(opt):
    """print on the main process only."""
    return (lambda *a, **k: print(*a, **k)) if is_main(opt) else (lambda *a, **k: None)


def prepare_save_folder(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, '.write_test')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise UserError("cannot write to the run folder '{}' ({}); choose another --save_root"
                        .format(folder, e.strerror or e))


def load_checkpoint(path, what='checkpoint'):
    """torch.load on the CPU with a one-line error for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise UserError("{} '{}' does not exist; check the path".format(what, path))
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # torch raises many types for a non-checkpoint file
        raise UserError("{} '{}' is not a readable PyTorch checkpoint ({}: {}); re-create or re-download it"
                        .format(what, path, type(e).__name__, str(e).splitlines()[0][:120] if str(e) else ''))


def load_state_strict(module, state_dict, path, what):
    """load_state_dict(strict=True) with a short report of mismatched keys instead of a traceback."""
    missing, unexpected, wrong_shape = [], [], []
    own = module.state_dict()
    for k in own:
        if k not in state_dict:
            missing.append(k)
        elif tuple(own[k].shape) != tuple(state_dict[k].shape):
            wrong_shape.append('{} {}->{}'.format(k, tuple(state_dict[k].shape), tuple(own[k].shape)))
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected or wrong_shape:
        # a module that knows why its state can differ (SemCKD: the batch size) raises a UserError from its
        # load_state_dict; anything else gets the list of mismatched keys
        try:
            module.load_state_dict(state_dict, strict=True)
        except RuntimeError:
            pass
        parts = []
        for label, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', wrong_shape)):
            if keys:
                parts.append('{} {} (e.g. {})'.format(len(keys), label, ', '.join(keys[:3])))
        raise UserError("{} '{}' does not match the {} architecture: {}".format(what, path, type(module).__name__,
                                                                                '; '.join(parts)))
    module.load_state_dict(state_dict, strict=True)


class Trainer:
    """The epoch loop shared by teacher and student training.

    ``modules`` maps checkpoint keys to the trained modules (``{'model': net}`` for a
    teacher, plus ``'distiller'`` for a student); ``eval_model`` is what validation runs.
    ``init`` is an optional ``(epochs, objective, optimizer)`` stage trained before the main
    one (no validation, constant learning rate), checkpointed and resumed like it.
    """

    def __init__(self, opt, objective, modules, eval_model, optimizer, train_loader, val_loader, device,
                 train_sampler=None, file_prefix='model', extra_state=None, scaler=None, init=None):
        self.opt, self.objective, self.modules = opt, objective, modules
        self.eval_model, self.optimizer, self.device = eval_model, optimizer, device
        self.train_loader, self.val_loader, self.train_sampler = train_loader, val_loader, train_sampler
        self.prefix = file_prefix
        self.extra_state = extra_state or {}
        self.scaler = scaler
        self.folder = opt.save_folder
        self.log = log_main(opt)
        self.start_epoch, self.best_acc, self.best_epoch = 1, 0.0, 0
        self.init_epochs, self.init_objective, self.init_optimizer = init if init is not None else (0, None, None)
        self.init_done = 0  # init-stage epochs finished

    # ---------------------------------------------------------------- checkpoints
    def _path(self, name):
        return os.path.join(self.folder, name)

    def _lean_state(self, epoch, acc):
        state = {key: unwrap(m).state_dict() for key, m in self.modules.items()}
        state.update(epoch=epoch, accuracy=acc, best_acc=self.best_acc, opt=_jsonable(vars(self.opt)),
                     **self.extra_state)
        return state

    def _full_state(self, epoch, acc):
        state = self._lean_state(epoch, acc)
        state.update(optimizer=self.optimizer.state_dict(), best_epoch=self.best_epoch, rng=self.rng,
                     data_seed=getattr(self.train_sampler, 'seed', None),
                     scaler=self.scaler.state_dict() if self.scaler is not None else None,
                     init_epoch=self.init_done)
        if self.init_optimizer is not None and epoch == 0:
            state['init_optimizer'] = self.init_optimizer.state_dict()
        return state

    def resume(self, path):
        """Restore a ``*_last.pth``; training continues at the epoch after it."""
        if path == 'auto':
            path = self._path('{}_last.pth'.format(self.prefix))
            if not os.path.isfile(path):
                raise UserError("--resume auto: no checkpoint '{}' in this run folder yet; start without --resume"
                                .format(path))
        ckpt = load_checkpoint(path, 'resume checkpoint')
        if 'optimizer' not in ckpt or 'rng' not in ckpt:
            raise UserError("--resume '{}' is not a *_last.pth checkpoint (it lacks the optimiser/RNG state)"
                            .format(path))
        for key, value in self.extra_state.items():
            if ckpt.get(key) != value:
                raise UserError("--resume '{}' belongs to a run with {}={!r}, not {!r}; resume the matching run"
                                .format(path, key, ckpt.get(key), value))
        for key, module in self.modules.items():
            load_state_strict(unwrap(module), ckpt[key], path, 'resume checkpoint')
        self.optimizer.load_state_dict(ckpt['optimizer'])
        # a checkpoint written during the init stage (epoch 0) continues it; a later one skips it
        self.init_done = self.init_epochs if ckpt['epoch'] > 0 else min(ckpt.get('init_epoch') or 0, self.init_epochs)
        if ckpt['epoch'] == 0 and self.init_optimizer is not None and ckpt.get('init_optimizer'):
            self.init_optimizer.load_state_dict(ckpt['init_optimizer'])
        if self.scaler is not None and ckpt.get('scaler'):
            self.scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt['rng'])
        if ckpt.get('data_seed') is not None and hasattr(self.train_sampler, 'seed'):
            # the epoch order follows (seed, epoch): keep the run's seed even when none was given
            self.train_sampler.seed = ckpt['data_seed']
        self.start_epoch = ckpt['epoch'] + 1
        self.best_acc, self.best_epoch = ckpt['best_acc'], ckpt.get('best_epoch', 0)
        if ckpt['epoch'] == 0:
            self.log('==> resumed from {} (init epoch {}/{})'.format(path, self.init_done, self.init_epochs))
        else:
            self.log('==> resumed from {} (epoch {}, best acc {:.2f})'.format(path, ckpt['epoch'], self.best_acc))

    # ---------------------------------------------------------------- the loop
    def fit(self):
        opt = self.opt
        main = is_main(opt)
        runlog = RunLog(self.folder, enabled=main, resume_epoch=self.start_epoch - 1)
        started = time.time()
        try:
            self._fit_init_stage()
            for epoch in range(self.start_epoch, opt.epochs + 1):
                if self.train_sampler is not None:
                    self.train_sampler.set_epoch(epoch)
                self.objective.on_epoch_start(epoch)
                lr = adjust_learning_rate(epoch, opt, self.optimizer)
                self.log('==> epoch {}/{}  lr {:g}'.format(epoch, opt.epochs, lr))
                train = train_epoch(epoch, self.train_loader, self.objective, self.optimizer, opt, self.device,
                                    scaler=self.scaler, log=self.log, eta_epochs_left=opt.epochs - epoch)
                test_acc, test_acc_top5, test_loss = validate(self.val_loader, self.eval_model, opt, self.device)
                self.log(' * epoch {}  train acc@1 {:.2f}  test acc@1 {:.2f}  acc@5 {:.2f}  loss {:.4f}  ({:.1f} s)'
                         .format(epoch, train['train_acc'], test_acc, test_acc_top5, test_loss,
                                 train['epoch_time_s']))
                self.rng = rng_state()  # a gather under DDP: every process takes part
                if main:
                    self._end_of_epoch(epoch, lr, train, test_acc, test_acc_top5, test_loss, runlog)
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.barrier()
        finally:
            runlog.close()
        if main:
            self.log('best accuracy: {:.2f} (epoch {})'.format(self.best_acc, self.best_epoch))
            self.write_parameters(total_time_s=time.time() - started)
        return self.best_acc

    def _fit_init_stage(self):
        """The method's init stage, epochs ``init_done + 1 .. init_epochs``; each ends in ``*_last.pth``."""
        opt = self.opt
        for k in range(self.init_done + 1, self.init_epochs + 1):
            if self.train_sampler is not None:
                # the same (seed, k) order an uninterrupted run's init epoch k had
                self.train_sampler.set_epoch(k)
            lr = self.init_optimizer.param_groups[0]['lr']
            self.log('==> init epoch {}/{}  lr {:g}'.format(k, self.init_epochs, lr))
            train = train_epoch(k, self.train_loader, self.init_objective, self.init_optimizer, opt, self.device,
                                log=self.log, eta_epochs_left=self.init_epochs - k, label='Init epoch')
            terms = ', '.join('{} {:.4f}'.format(name[5:], v) for name, v in train.items() if name.startswith('loss_'))
            self.log(' * init epoch {}/{}  loss {:.4f} ({})  ({:.1f} s)'.format(
                k, self.init_epochs, train['train_loss'], terms, train['epoch_time_s']))
            self.init_done = k
            self.rng = rng_state()  # a gather under DDP: every process takes part
            if is_main(opt):
                save_checkpoint(self._full_state(0, 0.0), self._path('{}_last.pth'.format(self.prefix)))
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()
        if self.init_objective is not None:
            self.init_objective.finish()

    def _end_of_epoch(self, epoch, lr, train, test_acc, test_acc_top5, test_loss, runlog):
        opt = self.opt
        if test_acc > self.best_acc or self.best_epoch == 0:
            self.best_acc, self.best_epoch = test_acc, epoch
            save_checkpoint(self._lean_state(epoch, test_acc), self._path('{}_best.pth'.format(self.prefix)))
            save_dict_to_json({'test_acc': test_acc, 'test_acc_top5': test_acc_top5, 'test_loss': test_loss,
                               'epoch': epoch}, self._path('test_best_metrics.json'))
            self.log('saving the best model (epoch {}, acc@1 {:.2f})'.format(epoch, test_acc))
        record = {'epoch': epoch, 'lr': lr, 'test_acc': test_acc, 'test_acc_top5': test_acc_top5,
                  'test_loss': test_loss, 'best_acc': self.best_acc}
        record.update(train)
        runlog.log_epoch(record)
        if epoch % opt.save_freq == 0 or epoch == opt.epochs:
            save_checkpoint(self._lean_state(epoch, test_acc), self._path('ckpt_epoch_{}.pth'.format(epoch)))
        save_checkpoint(self._full_state(epoch, test_acc), self._path('{}_last.pth'.format(self.prefix)))

    def write_parameters(self, **extra):
        params = _jsonable(vars(self.opt))
        model = unwrap(self.modules['model'])
        params['total_params_M'] = sum(p.numel() for p in model.parameters()) / 1e6
        params.update(extra)
        save_dict_to_json(params, self._path('parameters.json'))


def _jsonable(d):
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = str(v)
    return out


def run_main(main, argv=None):
    """Run an entry point: a UserError becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print('error: {}'.format(e), file=sys.stderr)
        sys.exit(2)
