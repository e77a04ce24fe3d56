"""Small shared pieces: accuracy, learning-rate schedule, device metrics, atomic files, seeding."""
import json
import os
import random
import tempfile
import warnings

import numpy as np
import torch


def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent, as 0-dim tensors on the logits' device (no host sync)."""
    maxk = max(topk)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.eq(target.reshape(-1, 1))
    # reshape, not view: the reference's .view(-1) fails on this non-contiguous slice (quirk 2)
    return [correct[:, :k].reshape(-1).float().sum() * (100.0 / target.size(0)) for k in topk]


def lr_at_epoch(epoch, opt):
    """Step schedule of the reference: decay by lr_decay_rate at each epoch in lr_decay_epochs."""
    steps = sum(epoch > e for e in opt.lr_decay_epochs)
    return opt.learning_rate * (opt.lr_decay_rate ** steps)


def adjust_learning_rate(epoch, opt, optimizer):
    """Set the learning rate of ``epoch`` (1-based) on every parameter group; return it."""
    lr = lr_at_epoch(epoch, opt)
    for group in optimizer.param_groups:
        group['lr'] = lr
    return lr


class Meter:
    """Sums of per-sample loss and top-1/top-5 hits, kept on the device, and the sample count.

    ``update`` never synchronises with the host: the sums stay on the device and the count,
    which the host knows, stays on the host. ``values()`` does (call it only when printing).
    ``all_reduce`` sums the counts of every process, weighted by their sample counts, so
    uneven shards give the exact global mean.
    """

    def __init__(self, device):
        # [loss_sum, top1_hits, top5_hits]
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.n = 0

    def update(self, loss, logits, target):
        n = target.size(0)
        acc1, acc5 = accuracy(logits.detach(), target, topk=(1, min(5, logits.size(1))))
        self.sums += torch.stack([loss.detach().double() * n, acc1.double() * n / 100.0,
                                  acc5.double() * n / 100.0])
        self.n += n

    def all_reduce(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.cat([self.sums, self.sums.new_full((1,), self.n)])
            torch.distributed.all_reduce(both)
            self.sums = both[:3].clone()
            self.n = int(both[3])
        return self

    def values(self):
        """(top1 %, top5 %, mean loss, n) as Python floats."""
        loss_sum, hit1, hit5 = self.sums.tolist()
        n = max(self.n, 1)
        return 100.0 * hit1 / n, 100.0 * hit5 / n, loss_sum / n, self.n


class TermMeter:
    """Per-sample means of a step's named loss terms, summed on the device like ``Meter``.

    Every step must give the same names (the first step's); ``update`` never synchronises
    with the host, ``values`` and ``brief`` do.
    """

    def __init__(self, device):
        self.device = device
        self.names = None
        self.sums = None  # [term sums..., n]

    def update(self, terms, n):
        if self.names is None:
            self.names = list(terms)
            self.sums = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=self.device)
        elif list(terms) != self.names:
            raise ValueError('loss terms changed from {} to {} between steps'.format(self.names, list(terms)))
        values = [torch.as_tensor(terms[name], device=self.device).detach().double().reshape(()) for name in self.names]
        self.sums += torch.stack(values + [torch.tensor(0.0, dtype=torch.float64, device=self.device)]) * n
        self.sums[-1] += n

    def all_reduce(self):
        if self.sums is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums)
        return self

    def values(self):
        """{name: mean} as Python floats."""
        if self.names is None:
            return {}
        sums = self.sums.tolist()
        n = max(sums[-1], 1.0)
        return {name: value / n for name, value in zip(self.names, sums)}

    def brief(self):
        """'  (cls 4.1234, kd 0.0123)' when there is more than one term, else ''."""
        values = self.values()
        if len(values) < 2:
            return ''
        return '  ({})'.format(', '.join('{} {:.4f}'.format(k, v) for k, v in values.items()))


def format_eta(seconds):
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return '{:d}:{:02d}:{:02d}'.format(h, m, s)


def _atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename it into place.

    A kill at any moment leaves either the old file or the new one, never a torn one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_checkpoint(state, path):
    _atomic_write(path, lambda f: torch.save(state, f))


def save_dict_to_json(d, path):
    """Atomically write a JSON dict (numbers kept as floats, tensors converted)."""
    def convert(v):
        if isinstance(v, torch.Tensor):
            return v.tolist()
        if isinstance(v, (np.generic,)):
            return v.item()
        return v
    text = json.dumps({k: convert(v) for k, v in d.items()}, indent=2, sort_keys=True, default=str)
    _atomic_write(path, lambda f: f.write(text.encode() + b'\n'))


def write_jsonl(records, path):
    """Atomically (re)write a JSON-lines file, one record per line."""
    text = ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records)
    _atomic_write(path, lambda f: f.write(text.encode()))


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def set_seed(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)


def _rank_and_world():
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _own_rng_state():
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    # only the GPU this process drew from; a process that never touched CUDA has no CUDA stream to keep
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def rng_state():
    """Every RNG this process draws from, in a form torch.save/torch.load round-trip.

    Under DDP a collective: every process's state, gathered into ``{'world_size': W, 'ranks':
    [state of rank 0, ...]}`` on all of them (rank 0 writes it into the checkpoint).
    """
    rank, world = _rank_and_world()
    if world == 1:
        return _own_rng_state()
    states = [None] * world
    torch.distributed.all_gather_object(states, _own_rng_state())
    return {'world_size': world, 'ranks': states}


def set_rng_state(state):
    """Restore what ``rng_state`` saved: under DDP each process takes its own rank's state.

    A checkpoint of another number of processes cannot give each process its stream: then the
    streams stay as they are (seeded, or fresh), with a warning that the run is not bit-exact.
    """
    rank, world = _rank_and_world()
    saved_world = state.get('world_size', 1)
    if saved_world != world:
        warnings.warn('the checkpoint holds the random state of {} process(es) and this run has {}: the random '
                      'streams are not restored, so the run continues as an uninterrupted one would only '
                      'statistically'.format(saved_world, world))
        return
    if 'ranks' in state:
        state = state['ranks'][rank]
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda')
    if cuda is None or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if isinstance(cuda, (list, tuple)):
        # a checkpoint of an older version: the states of every GPU it saw; ours if it saw it
        if device >= len(cuda):
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda, device)
