"""CRD's memory bank of embeddings (Tian et al., "Contrastive Representation Distillation", ICLR 2020).

``ContrastMemory`` keeps one L2-normalised embedding per training sample for each side
(``memory_v1``: student embeddings, ``memory_v2``: teacher embeddings). Each step it scores
every anchor against its positive and ``K`` negatives drawn from the *other* side's bank,
then moves the rows of the current samples towards their new embeddings (momentum update).

Differences from the RepDistiller/SemCKD code, none of which changes a value:
  * the banks and the normalisation constants are buffers, so they follow ``.to(device)``
    and are saved/restored with the state_dict (a resumed run keeps the constants);
  * scores come from one ``(batch, n_data)`` matrix product followed by a gather, instead of
    gathering ``batch * (K + 1)`` bank rows (537 MB per bank per step for CIFAR-100 with the
    default ``K = 16384``); the gather is still used when it is the smaller of the two;
  * no host-device synchronisation: the constants are fixed on the device with ``torch.where``,
    and once they are, later steps skip computing them (no all-reduce per step under DDP);
  * negatives, when not supplied, are drawn with torch's RNG on the bank's device (uniform,
    which is what the reference's alias sampler with all-ones weights amounts to).
"""
import math

import torch
from torch import nn


class ContrastMemory(nn.Module):
    """Memory bank supplying the negatives of CRD's two symmetric contrastive losses.

    Args (reference names and order):
        inputSize: embedding size (``--feat_dim``).
        outputSize: number of training samples (``n_data``); one bank row each.
        K: negatives per positive (``--nce_k``).
        T: temperature (``--nce_t``).
        momentum: weight of the old row in the update (``--nce_m``).

    ``forward(v1, v2, y, idx=None)`` takes the student embeddings ``v1`` and teacher
    embeddings ``v2`` (``[bsz, inputSize]``, L2-normalised), the samples' data set indices
    ``y`` and the ``[bsz, K + 1]`` contrast indices (column 0 the positive). It returns
    ``(out_v1, out_v2)``, each ``[bsz, K + 1]``: ``exp(<bank row, anchor> / T) / Z``, where
    ``out_v1`` scores student anchors against the teacher bank and ``out_v2`` teacher anchors
    against the student bank. ``Z`` is ``n_data`` times the mean unnormalised score of the
    first batch seen and stays fixed afterwards (CRD's design).

    The banks are updated in place during ``forward`` and autograd keeps them for the
    backward pass: call ``backward`` on one forward's loss before the next forward (the
    training loop's order); otherwise autograd reports a tensor modified in place.
    """

    def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5):
        super(ContrastMemory, self).__init__()
        self.nLem = outputSize
        self.K = K
        self.T = T
        self.momentum = momentum
        # one dense score row per sample is cheaper than gathering K + 1 bank rows of
        # inputSize floats per sample whenever n_data <= (K + 1) * inputSize
        self.dense_scores = outputSize <= (K + 1) * inputSize
        stdv = 1. / math.sqrt(inputSize / 3)
        self.register_buffer('memory_v1', torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))
        self.register_buffer('memory_v2', torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))
        # negative until the first batch fixes them
        self.register_buffer('Z_v1', torch.tensor(-1.0))
        self.register_buffer('Z_v2', torch.tensor(-1.0))
        # host-side: are Z_v1/Z_v2 fixed? False until a forward has run since the last state_dict load
        self._constants_fixed = False

    def sample(self, y):
        """Draw ``[bsz, K + 1]`` indices uniformly (torch RNG, bank's device); column 0 = ``y``."""
        idx = torch.randint(0, self.nLem, (y.shape[0], self.K + 1), device=self.memory_v1.device)
        idx[:, 0] = y
        return idx

    def forward(self, v1, v2, y, idx=None):
        y = y.to(device=self.memory_v1.device, dtype=torch.long).view(-1)
        if idx is None:
            idx = self.sample(y)
        idx = idx.to(device=self.memory_v1.device, dtype=torch.long)
        # scores are exponentiated with T = 0.07: keep them in the banks' precision (float32
        # under AMP too)
        with torch.autocast(device_type=v1.device.type, enabled=False):
            v1 = v1.to(self.memory_v1.dtype)
            v2 = v2.to(self.memory_v1.dtype)
            # under DDP every process applies the update of the whole global batch, so the
            # banks stay identical across processes (as with one process and the same batch)
            all_v1, all_v2, all_y = _gather_from_processes(v1.detach(), v2.detach(), y)
            if self.dense_scores:
                old_v1, old_v2 = self._update(all_v1, all_v2, all_y)
                hit, pos = self._updated_positions(all_y, idx)
                out_v2 = self._dense_scores(v2, self.memory_v1, old_v1, idx, hit, pos)
                out_v1 = self._dense_scores(v1, self.memory_v2, old_v2, idx, hit, pos)
            else:
                out_v2 = self._gathered_scores(v2, self.memory_v1, idx)
                out_v1 = self._gathered_scores(v1, self.memory_v2, idx)
                self._update(all_v1, all_v2, all_y)
            out_v1 = torch.exp(out_v1 / self.T)
            out_v2 = torch.exp(out_v2 / self.T)
            if not self._constants_fixed:
                # the first batch fixes them (a loaded state_dict may have done so: where() keeps those)
                self._fix_constant(self.Z_v1, out_v1)
                self._fix_constant(self.Z_v2, out_v2)
                self._constants_fixed = True
            return out_v1 / self.Z_v1, out_v2 / self.Z_v2

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # the loaded constants may be unset (-1): let the next batch look again
        self._constants_fixed = False

    @staticmethod
    def _gathered_scores(v, bank, idx):
        bsz, k1 = idx.shape
        rows = bank.index_select(0, idx.view(-1)).view(bsz, k1, -1)
        return torch.bmm(rows, v.unsqueeze(2)).squeeze(2)

    def _updated_positions(self, y, idx):
        """For each entry of ``idx``: does it point at a row updated this step, and at which
        position of ``y`` (rows repeated in ``y`` share one old value, so any position will do)."""
        pos = torch.full((self.nLem,), -1, dtype=torch.long, device=idx.device)
        pos[y] = torch.arange(y.shape[0], device=idx.device)
        pos = pos[idx]
        return pos >= 0, pos.clamp(min=0)

    @staticmethod
    def _dense_scores(v, bank, old_rows, idx, hit, pos):
        """Scores against the bank as it was before this step's update.

        The bank has already been updated in place (so autograd may keep it for the
        backward pass without a copy); entries that point at an updated row (``hit``) are
        scored against that row's old value ``old_rows[pos]`` instead.
        """
        scores = (v @ bank.t()).gather(1, idx)
        old_scores = (v @ old_rows.t()).gather(1, pos)
        return torch.where(hit, old_scores, scores)

    @torch.no_grad()
    def _update(self, v1, v2, y):
        """Momentum update ``row = normalize(m * row + (1 - m) * v)``; returns the old rows."""
        old_v1 = self.memory_v1.index_select(0, y)
        old_v2 = self.memory_v2.index_select(0, y)
        for bank, old, v in ((self.memory_v1, old_v1, v1), (self.memory_v2, old_v2, v2)):
            new = old * self.momentum + v.detach() * (1 - self.momentum)
            new = new / new.pow(2).sum(1, keepdim=True).sqrt()
            bank.index_copy_(0, y, new)
        return old_v1, old_v2

    @torch.no_grad()
    def _fix_constant(self, Z, out):
        mean = out.mean()
        if _world_size() > 1:  # one constant for all processes: the mean over the global batch
            mean = mean.clone()
            torch.distributed.all_reduce(mean)
            mean /= _world_size()
        Z.copy_(torch.where(Z < 0, mean * self.nLem, Z))


def _world_size():
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_from_processes(*tensors):
    """Concatenate each tensor over the processes of a DDP run (itself when there is one process)."""
    world = _world_size()
    if world == 1:
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world)]
        torch.distributed.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)
