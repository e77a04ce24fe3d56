"""Where a run's results go: metrics.jsonl (one line per epoch), tensorboard scalars, JSON summaries,
and, when the run asks for it (--wandb), Weights & Biases."""
import json
import os
import re
import uuid

from helper.util import read_jsonl, write_jsonl


class RunLog:
    """Per-epoch metrics of one run, kept consistent across resumes.

    The metrics file is rewritten atomically each epoch from the in-memory list, so a
    kill never leaves a torn line, and a resumed run (``resume_epoch``) drops lines of
    epochs after its checkpoint instead of duplicating them. Each epoch's record is also
    forwarded to the hooks the run's flags ask for (``epoch_hooks``).
    """

    def __init__(self, folder, enabled=True, resume_epoch=0):
        self.enabled = enabled
        self.path = os.path.join(folder, 'metrics.jsonl')
        self.records = [r for r in read_jsonl(self.path) if r.get('epoch', 0) <= resume_epoch] if enabled else []
        self.writer = None
        self.hooks = []
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(folder, 'tensorboard'), purge_step=resume_epoch + 1)
            self.hooks = epoch_hooks(folder, resume_epoch)

    def log_epoch(self, record):
        if not self.enabled:
            return
        self.records.append(record)
        write_jsonl(self.records, self.path)
        for key, value in record.items():
            if key != 'epoch' and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record['epoch'])
        self.writer.flush()
        for hook in self.hooks:
            hook.log_epoch(record)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        for hook in self.hooks:
            hook.close()


def epoch_hooks(folder, resume_epoch):
    """The extra loggers of a run, from its flags (the parameters.json both training scripts write
    into the run folder before the first epoch)."""
    path = os.path.join(folder, 'parameters.json')
    try:
        with open(path) as f:
            flags = json.load(f)
    except (OSError, ValueError):
        return []
    return [WandbLog(folder, flags, resume_epoch)] if flags.get('wandb') else []


class WandbLog:
    """Weights & Biases, imported only here: one W&B run per run folder, named after it, grouped
    with its other trials, config = the run's flags, one step per epoch. A resumed run continues
    its W&B run (the id is kept in the folder's wandb_run_id)."""

    def __init__(self, folder, flags, resume_epoch):
        import wandb
        name = os.path.basename(os.path.normpath(folder))
        id_file = os.path.join(folder, 'wandb_run_id')
        run_id = None
        if resume_epoch > 0 and os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip() or None
        if run_id is None:
            run_id = uuid.uuid4().hex[:16]
            with open(id_file, 'w') as f:
                f.write(run_id)
        self.run = wandb.init(project=flags.get('wandb_project') or 'kd-{}'.format(flags.get('dataset', 'run')),
                              entity=flags.get('wandb_entity'), name=name,
                              group=re.sub(r'_(trial_)?[^_]+$', '', name), config=flags, dir=folder, id=run_id,
                              resume='allow', mode=flags.get('wandb_mode'))

    def log_epoch(self, record):
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(values, step=int(record['epoch']))

    def close(self):
        self.run.finish()
