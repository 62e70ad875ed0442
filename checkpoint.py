"""
Checkpoints: one place that writes them and one that turns them back into a model.

A checkpoint is one dict of plain tensors and Python types (so it loads with weights_only=True, which
cannot run code hidden in a file someone sent you):
    format_version, model (the raw, uncompiled, unwrapped state_dict), optimizer, scaler, model_args,
    config (the full run config), iter_num (steps done), best_val_loss, vocab (a tokenizer spec),
    rng (every random state the run's future depends on).

In out_dir:
    ckpt.pt       the latest state: what init_from='resume' continues
    ckpt_prev.pt  the ckpt.pt before it, to step back to if the latest went bad
    best.pt       the one with the lowest val loss so far: what sample.py reads; only a better one replaces it
Names are only ever replaced whole. A new checkpoint is written to ckpt.pt.tmp and fsynced, and only
then do the names move (hard links and renames, each atomic): at every moment, a crash or SIGKILL
included, ckpt.pt is a complete checkpoint, the new one or the one before. A leftover *.tmp is an
unfinished save: nothing reads it, and the next save removes it. Hard links mean no copies: the three
names hold at most three distinct files (plus the one being written).
"""

import os
import shutil

import torch

from configurator import UserError
from model import GPT, GPTConfig

FORMAT_VERSION = 1


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open folders; the rename is still atomic there
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(obj, path):
    with open(path, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before any name points at them


def _link_over(src, dst):
    """Make dst name the same file as src, atomically: dst is the old file or src, never partial."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return  # already done (before a crash); renaming one link of a file over another would do nothing
    tmp = dst + '.tmp'
    try:
        os.link(src, tmp)  # a hard link: no second copy on disk
    except OSError:  # file systems without hard links
        shutil.copyfile(src, tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


def save_checkpoint(ckpt, out_dir, is_best):
    """Write ckpt.pt, keep the one it replaces as ckpt_prev.pt, and when is_best make best.pt the
    same file. best.pt changes only here, so only a model the caller found better replaces it."""
    os.makedirs(out_dir, exist_ok=True)
    path, prev, best = (os.path.join(out_dir, name) for name in ('ckpt.pt', 'ckpt_prev.pt', 'best.pt'))
    tmp = path + '.tmp'
    for stale in (tmp, prev + '.tmp', best + '.tmp'):  # what a crash in an earlier save left behind
        if os.path.exists(stale):
            os.remove(stale)  # (so that writing never goes into a file that another name shares)
    _write_synced(ckpt, tmp)  # all the slow writing happens here, before any name moves
    if os.path.exists(path):
        _link_over(path, prev)  # for a moment ckpt_prev.pt and ckpt.pt are the same file: both loadable
    os.replace(tmp, path)
    if is_best:
        _link_over(path, best)
    _fsync_dir(out_dir)


def load_checkpoint(path, device='cpu'):
    """Read a checkpoint dict safely; a missing, foreign or corrupt file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path} (train one first, or point --out_dir at the run's folder)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".split('\n')[0][:200]  # (an empty file's error has no message)
        raise UserError(f"checkpoint {path} cannot be read ({reason}); it is corrupt or not a nanogpt "
                        "checkpoint: use another one, e.g. ckpt_prev.pt or best.pt beside it") from None
    if not isinstance(ckpt, dict) or ckpt.get('format_version') != FORMAT_VERSION:
        raise UserError(f"{path} is not a nanogpt checkpoint of format version {FORMAT_VERSION}")
    return ckpt


def model_from_checkpoint(ckpt, dropout=None):
    """The GPT a checkpoint holds, on the CPU, in fp32; dropout may be overridden (e.g. 0 to sample)."""
    args = dict(ckpt['model_args'])
    if dropout is not None:
        args['dropout'] = dropout
    model = GPT(GPTConfig(**args))
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit its model_args ({' '.join(str(e).split())[:300]})") from None
    return model
