"""
Checkpoints: one place that writes them and one that turns them back into a model.

A checkpoint is one dict of plain tensors and Python types (so it loads with weights_only=True, which
cannot run code hidden in a file someone sent you):
    format_version, model (the raw, uncompiled, unwrapped state_dict), optimizer, scaler, model_args,
    config (the full run config), iter_num (steps done), best_val_loss, vocab (a tokenizer spec),
    rng (every random state the run's future depends on).

In out_dir, ckpt.pt is the latest state (what init_from='resume' continues) and best.pt the one with
the lowest val loss so far (what sample.py reads). Both are only ever replaced whole: written to a
temporary file, fsynced, then renamed over the old one, so a crash leaves the old or the new file.
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


def atomic_save(obj, path):
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_checkpoint(ckpt, out_dir, is_best):
    """Write ckpt.pt, and when is_best also make best.pt the same file (a hard link: no second copy
    on disk; a later ckpt.pt is a new file, so best.pt keeps its bytes)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'ckpt.pt')
    atomic_save(ckpt, path)
    if is_best:
        best, tmp = os.path.join(out_dir, 'best.pt'), os.path.join(out_dir, 'best.pt.tmp')
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, best)
        _fsync_dir(out_dir)


def load_checkpoint(path, device='cpu'):
    """Read a checkpoint dict safely; a missing, foreign or corrupt file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path} (train one first, or point --out_dir at the run's folder)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "it is corrupt or not a nanogpt checkpoint: use another one, e.g. best.pt or ckpt.pt") from None
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
