"""
Checkpoints: the format, written crash-safely, read safely, and turned back into a model or a run.

A checkpoint is one dict of plain tensors and Python types (so it loads with weights_only=True,
which cannot run code hidden in a file someone sent you):
    format_version, model (the raw, uncompiled, unwrapped state_dict), optimizer, scaler,
    model_args, config (the full run config), iter_num (steps done), best_val_loss,
    vocab (a tokenizer spec), rng (every random state the run's future depends on), data_sha256
    (of the val.bin its losses were measured on), lora (apply_lora's arguments, None without LoRA;
    with LoRA, model holds the frozen base weights and the adapters side by side).

In out_dir:
    ckpt.pt       the latest state: what init_from='resume' continues
    ckpt_prev.pt  the ckpt.pt before it, to step back to if the latest went bad
    best.pt       the one with the lowest val loss so far: what sample.py reads; only a better one
                  replaces it
Names are only ever replaced whole. A new checkpoint is written to ckpt.pt.tmp and fsynced, and only
then do the names move (hard links and renames, each atomic): at every moment, a crash or SIGKILL
included, ckpt.pt is a complete checkpoint, the new one or the one before (a leftover *.tmp is an
unfinished save, removed by the next). Hard links: at most three distinct files (+ the new one).
"""

import os
import random
import shutil
import sys
import zipfile
from dataclasses import asdict, fields

import numpy as np
import torch

from model import GPT, MODERN_SWITCHES, GPTConfig
from nanogpt.errors import UserError
from nanogpt.hf import from_pretrained
from nanogpt.lora import apply_lora, lora_args, merge_lora
from nanogpt.parallel import load_optimizer_state, state_dicts
from nanogpt.tokenizer import GPT2_VOCAB, Tokenizer, padded_vocab_size

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
        # already done (before a crash); renaming one link of a file over another would do nothing
        return
    tmp = dst + '.tmp'
    try:
        os.link(src, tmp)  # a hard link: no second copy on disk
    except OSError:  # file systems without hard links
        shutil.copyfile(src, tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


def save_checkpoint(ckpt, out_dir, is_best, keep_prev=True):
    """Write ckpt.pt, keep the one it replaces as ckpt_prev.pt (unless keep_prev is False), and when
    is_best make best.pt the same file: only a model the caller found better replaces best.pt.
    Disk: up to four checkpoints at once (the three names and the one being written)."""
    os.makedirs(out_dir, exist_ok=True)
    path, prev, best = (os.path.join(out_dir, name)
                        for name in ('ckpt.pt', 'ckpt_prev.pt', 'best.pt'))
    tmp = path + '.tmp'
    for stale in (tmp, prev + '.tmp', best + '.tmp'):  # what a crash in an earlier save left behind
        if os.path.exists(stale):
            os.remove(stale)  # (so that writing never goes into a file that another name shares)
    try:
        _write_synced(ckpt, tmp)  # all the slow writing happens here, before any name moves
    except (OSError, RuntimeError) as e:  # a full disk: torch raises RuntimeError from its writer
        if os.path.exists(tmp):
            os.remove(tmp)  # give the space back; the checkpoints in out_dir are untouched
        reason = str(e).split('\n')[0][:200]
        raise UserError(f"could not write a checkpoint to {out_dir} ({reason}): free some disk "
                        "space, then resume; the checkpoints there are as they were") from None
    if keep_prev and os.path.exists(path):
        # for a moment ckpt_prev.pt and ckpt.pt are the same file: both loadable
        _link_over(path, prev)
    os.replace(tmp, path)
    if is_best:
        _link_over(path, best)
    _fsync_dir(out_dir)


def load_checkpoint(path, device='cpu'):
    """Read a checkpoint dict safely; a missing, foreign or corrupt file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path} "
                        "(train one first, or point --out_dir at the run's folder)")
    try:
        # torch.save writes a zip whose members carry CRC-32s, which reading with mmap would not
        # check: a flipped bit in the weights is caught here, at the cost of one read of the file
        with zipfile.ZipFile(path) as z:
            if bad := z.testzip():
                raise ValueError(f"member {bad} fails its CRC-32 check")
        # mmap: tensors are read from the file as they are used, not all copied into memory first
        # (under DDP every process loads the checkpoint; they then share the pages)
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:
        # the type's name too: an empty file's error has no message
        reason = f"{type(e).__name__}: {e}".split('\n')[0][:200]
        raise UserError(f"checkpoint {path} cannot be read ({reason}); it is corrupt or not a "
                        "nanogpt checkpoint: use another one, e.g. ckpt_prev.pt or best.pt "
                        "beside it") from None
    if not isinstance(ckpt, dict) or ckpt.get('format_version') != FORMAT_VERSION:
        raise UserError(f"{path} is not a nanogpt checkpoint of format version {FORMAT_VERSION}")
    return ckpt


def check_schema(ckpt, path):
    """Before anything is allocated: model_args' names and types as GPTConfig's, the embedding's
    shape, the layer count, and a vocabulary that covers the model's (padded) rows."""
    def bad(why):
        return UserError(f"{path} is malformed ({why}): use another checkpoint, e.g. ckpt_prev.pt "
                         "or best.pt beside it")
    missing = {'model', 'model_args', 'vocab'} - ckpt.keys()
    if missing:
        raise bad(f"no {', '.join(sorted(missing))}")
    args, state = ckpt['model_args'], ckpt['model']
    types = {f.name: f.type for f in fields(GPTConfig)}
    if not isinstance(args, dict) or not isinstance(state, dict) or args.keys() - types.keys():
        raise bad(f"model_args {args!r}"[:200])
    for k, v in args.items():
        if not isinstance(v, (int, float) if types[k] is float else types[k]) or \
                (types[k] is int and (isinstance(v, bool) or v <= 0)):
            raise bad(f"model_args {k}={v!r}")
    wte = state.get('transformer.wte.weight')
    shape = (args.get('vocab_size'), args.get('n_embd'))
    if wte is None or tuple(wte.shape) != shape:
        raise bad(f"token embedding {None if wte is None else tuple(wte.shape)}, "
                  f"model_args {shape}")
    n_layer = args.get('n_layer')
    if not any(k.startswith(f'transformer.h.{n_layer - 1}.') for k in state) or \
            any(k.startswith(f'transformer.h.{n_layer}.') for k in state):
        raise bad(f"n_layer={n_layer} does not match the weights")
    try:
        n_vocab = Tokenizer(ckpt['vocab']).vocab_size
    except (KeyError, TypeError, AttributeError) as e:
        raise bad(f"vocabulary spec {type(e).__name__}: {e}") from None
    if shape[0] not in (n_vocab, padded_vocab_size(n_vocab)):
        raise bad(f"its vocabulary has {n_vocab} tokens, its embedding {shape[0]} rows")


def model_from_checkpoint(ckpt, dropout=None, vocab_size=None):
    """The GPT a checkpoint holds, on the CPU, in fp32, dropout overridden if given (0 to sample);
    vocab_size: keep only the first vocab_size token rows, cutting off a padded vocabulary's unused
    ones. A LoRA run's checkpoint gives a model with its adapters (lora.merge_lora folds them)."""
    args, state = dict(ckpt['model_args']), ckpt['model']
    if dropout is not None:
        args['dropout'] = dropout
    if vocab_size is not None and vocab_size < args['vocab_size']:
        args['vocab_size'] = vocab_size
        state = {k: v[:vocab_size] if k in ('transformer.wte.weight', 'lm_head.weight') else v
                 for k, v in state.items()}
    lora = ckpt.get('lora')
    try:
        model = GPT.from_state_dict(GPTConfig(**args), state,
                                    adapt=(lambda m: apply_lora(m, **lora)) if lora else None)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError("checkpoint weights do not fit its model_args "
                        f"({' '.join(str(e).split())[:300]})") from None
    return model


# a training run's state: what a resume needs to continue exactly ---------------------------------
def recorded_model_args(config):
    """The GPTConfig fields a checkpoint records: all, less the modern switches left at GPT-2's
    setting, so that a GPT-2 run's model_args read as they always did."""
    return {k: v for k, v in asdict(config).items()
            if k not in MODERN_SWITCHES or v != getattr(GPTConfig, k)}


def rng_state():
    np_state = np.random.get_state()
    return {'python': random.getstate(), 'torch': torch.get_rng_state(),
            'numpy': [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state['python']))
    torch.set_rng_state(state['torch'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy(), *rest))
    if (state['cuda'] and torch.cuda.is_available()
            and len(state['cuda']) == torch.cuda.device_count()):
        torch.cuda.set_rng_state_all(state['cuda'])


def build_checkpoint(model, optimizer, scaler, cfg, iter_num, best_val_loss, vocab,
                     data_sha256=None):
    """The checkpoint dict of a run after iter_num steps; model is the raw (uncompiled, un-DDP'd)
    GPT; data_sha256 identifies the val.bin its val losses were measured on. Under FSDP every
    process must call it (the state is gathered), and only process 0's is whole."""
    model_state, optimizer_state = state_dicts(model, optimizer)
    return {'format_version': FORMAT_VERSION, 'model': model_state,
            'optimizer': optimizer_state, 'scaler': scaler.state_dict(),
            'model_args': recorded_model_args(model.config), 'config': asdict(cfg),
            'iter_num': iter_num, 'best_val_loss': best_val_loss, 'vocab': vocab,
            'rng': rng_state(), 'data_sha256': data_sha256, 'lora': lora_args(cfg)}


def restore_training(ckpt, model, optimizer, scaler):
    """Put the optimizer (of model, which may be sharded), the gradient scaler and every random
    generator back as the checkpoint left them."""
    load_optimizer_state(model, optimizer, ckpt['optimizer'])
    # a run without fp16 saved an empty scaler state; resumed in fp16 it starts a fresh scaler
    if ckpt['scaler'] and scaler.is_enabled():
        scaler.load_state_dict(ckpt['scaler'])
    set_rng_state(ckpt['rng'])


def load_model(init_from='resume', out_dir='out', ckpt_name='best.pt'):
    """A model to sample or evaluate, in eval mode without dropout, on the CPU, in fp32, with its
    tokenizer and its checkpoint dict: from out_dir/ckpt_name (init_from='resume'; an absolute
    ckpt_name reads one from elsewhere; best.pt falls back to ckpt.pt, said, for a run too short
    to have evaluated), or OpenAI's GPT-2 / a Hugging Face folder (checkpoint None)."""
    if init_from != 'resume':
        return from_pretrained(init_from, dropout=0.0).eval(), Tokenizer(GPT2_VOCAB), None
    path = os.path.join(out_dir, ckpt_name)
    latest = os.path.join(out_dir, 'ckpt.pt')
    if ckpt_name == 'best.pt' and not os.path.exists(path) and os.path.isfile(latest):
        print(f"no best.pt in {out_dir} (the run stopped before its first evaluation): "
              "using ckpt.pt, its latest state", file=sys.stderr)
        path = latest
    ckpt = load_checkpoint(path)
    check_schema(ckpt, path)
    tokenizer = Tokenizer(ckpt['vocab'])
    model = model_from_checkpoint(ckpt, dropout=0.0, vocab_size=tokenizer.vocab_size)
    return merge_lora(model).eval(), tokenizer, ckpt
