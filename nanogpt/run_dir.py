"""
A run's folder (out_dir): one training run at a time (a lock), and its metrics log,
out_dir/metrics.jsonl, one JSON object per line, written by train.py and read here by everything
else (plot.py, resume, the tests).
"""

import json
import os
import time
from dataclasses import asdict

from nanogpt.errors import UserError


def claim_out_dir(cfg):
    """Make cfg.out_dir this run's, or say in one line why not: it is a file, cannot be written,
    another run holds its lock, or (for a run not resuming) it already holds a run. The lock is an
    flock on the folder itself (no lock file to leave behind): it lasts while the returned file
    descriptor is open, and the OS releases it when the process ends, however it ends, so a crash
    leaves no stale lock. os.close() it when the run is over."""
    import fcntl
    out_dir = cfg.out_dir
    if not out_dir or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
        raise UserError(f"out_dir {out_dir!r} is not a folder: "
                        "give the run one, e.g. --out_dir=out")
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(13, 'Permission denied')
        lock = os.open(out_dir, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out_dir} ({e.strerror}): "
                        "pick a folder you can write to") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise UserError(f"{out_dir} is in use by another training run: wait for it to end, "
                        "or give this one another --out_dir") from None
    held = [n for n in ('ckpt.pt', 'best.pt') if os.path.exists(os.path.join(out_dir, n))]
    if held and cfg.init_from != 'resume' and not cfg.overwrite:
        os.close(lock)
        raise UserError(f"{out_dir} already holds a run ({held[0]}): continue it with "
                        "--init_from=resume, give this one another --out_dir, or replace it "
                        "with --overwrite=True")
    return lock


def metrics_path(out_dir):
    return os.path.join(out_dir, 'metrics.jsonl')


def read_metrics(out_dir):
    """The rows of out_dir's metrics log. A line that is not JSON (a crash or a full disk mid-write
    leaves half a line) is dropped, and said, rather than ending the resume or plot reading it."""
    path = metrics_path(out_dir)
    if not os.path.isfile(path):
        raise UserError(f"no metrics log at {path}: train a run with this out_dir first")
    rows, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                dropped += bool(line.strip())
    if dropped:
        print(f"{path}: dropped {dropped} unreadable line(s) (a partial write, from a crash?)")
    return rows


class MetricsLog:
    """out_dir/metrics.jsonl, one JSON object per line, and Weights & Biases if asked for. A resumed
    run keeps the rows up to the step it resumes from and drops later ones, which it is about to
    redo."""

    def __init__(self, cfg, start_iter, tokens_per_iter):
        self.tokens_per_iter = tokens_per_iter
        path = metrics_path(cfg.out_dir)
        os.makedirs(cfg.out_dir, exist_ok=True)
        if start_iter > 0 and os.path.isfile(path):
            rows = read_metrics(cfg.out_dir)
            with open(path + '.tmp', 'w') as f:
                f.writelines(json.dumps(row) + '\n' for row in rows if row['iter'] <= start_iter)
            os.replace(path + '.tmp', path)
        self.file = open(path, 'w' if start_iter == 0 else 'a')  # a new run, a new log
        self.wandb = None
        if cfg.wandb_log:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_log=True needs Weights & Biases: "
                                "pip install -e .[wandb]") from None
            self.wandb = wandb
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))

    def log(self, iter_num, **row):
        row = {'iter': iter_num, 'tokens': iter_num * self.tokens_per_iter, **row,
               'time': round(time.time(), 3)}
        self.file.write(json.dumps(row) + '\n')
        self.file.flush()
        if self.wandb:
            self.wandb.log(row, step=iter_num)

    def close(self):
        self.file.close()
        if self.wandb:
            self.wandb.finish()
