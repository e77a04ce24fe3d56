"""Where a run's results go: metrics.jsonl (one line per epoch), tensorboard scalars, JSON summaries."""
import os

from helper.util import read_jsonl, write_jsonl


class RunLog:
    """Per-epoch metrics of one run, kept consistent across resumes.

    The metrics file is rewritten atomically each epoch from the in-memory list, so a
    kill never leaves a torn line, and a resumed run (``resume_epoch``) drops lines of
    epochs after its checkpoint instead of duplicating them.
    """

    def __init__(self, folder, enabled=True, resume_epoch=0):
        self.enabled = enabled
        self.path = os.path.join(folder, 'metrics.jsonl')
        self.records = [r for r in read_jsonl(self.path) if r.get('epoch', 0) <= resume_epoch] if enabled else []
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(folder, 'tensorboard'), purge_step=resume_epoch + 1)

    def log_epoch(self, record):
        if not self.enabled:
            return
        self.records.append(record)
        write_jsonl(self.records, self.path)
        for key, value in record.items():
            if key != 'epoch' and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record['epoch'])
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
