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
included, ckpt.pt is a complete checkpoint, the new one or the one before. A leftover *.tmp is an
unfinished save: nothing reads it, and the next save removes it. Hard links mean no copies: the
three names hold at most three distinct files (plus the one being written).
"""

import json
import os
import random
import shutil
import zipfile
from dataclasses import asdict, fields, replace

import numpy as np
import torch

from model import GPT, MODERN_SWITCHES, GPTConfig
from nanogpt.device import check_memory
from nanogpt.errors import UserError
from nanogpt.hf import from_pretrained
from nanogpt.lora import apply_lora, merge_lora
from nanogpt.parallel import load_optimizer_state, state_dicts
from nanogpt.tokenizer import GPT2_VOCAB, Tokenizer

FORMAT_VERSION = 1
# the GPTConfig fields a training config sets (vocab_size comes from the dataset)
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name != 'vocab_size')


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
    is_best make best.pt the same file. best.pt changes only here, so only a model the caller found
    better replaces it. Disk: up to four checkpoints at once (ckpt.pt, ckpt_prev.pt, best.pt and
    the one being written), three without ckpt_prev.pt."""
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
            bad = z.testzip()
        if bad:
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
    """What a model is built from must be what GPTConfig and the weights say, before anything is
    allocated: model_args' names and types, the embedding's shape, the layer count, and a
    vocabulary that covers the model's (padded) rows."""
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
    """The GPT a checkpoint holds, on the CPU, in fp32; dropout may be overridden (e.g. 0 to
    sample). vocab_size: keep only the first vocab_size token embeddings and logits, cutting off a
    padded vocabulary's unused rows (see padded_vocab_size). The checkpoint of a LoRA run gives a
    model with its adapters (lora.merge_lora folds them in)."""
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


# --------------------------------------------------------------------------------------------------
# a training run's state: what a resume needs to continue exactly

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


def lora_args(cfg):
    """apply_lora's arguments for a run's config; None without LoRA."""
    if not getattr(cfg, 'lora_rank', 0):
        return None
    return {'rank': cfg.lora_rank, 'alpha': cfg.lora_alpha, 'dropout': cfg.lora_dropout,
            'targets': cfg.lora_targets}


def restore_training(ckpt, model, optimizer, scaler):
    """Put the optimizer (of model, which may be sharded), the gradient scaler and every random
    generator back as the checkpoint left them."""
    load_optimizer_state(model, optimizer, ckpt['optimizer'])
    # a run without fp16 saved an empty scaler state; resumed in fp16 it starts a fresh scaler
    if ckpt['scaler'] and scaler.is_enabled():
        scaler.load_state_dict(ckpt['scaler'])
    set_rng_state(ckpt['rng'])


def padded_vocab_size(vocab_size, multiple=64):
    """The embedding rows of a model trained from scratch: a BPE vocabulary rounded up to a
    multiple of 64 (GPT-2's 50,257 to 50,304), as matmuls whose sizes divide by 64 run faster on
    GPUs (nanoGPT measured ~25%). The extra rows are never a target, so training pushes their
    logits down, and load_model cuts them off. A character vocabulary (at most a few hundred
    tokens) stays as it is: its head is a small part of the work, and padding would only change
    its numbers."""
    return vocab_size if vocab_size <= 1024 else -(-vocab_size // multiple) * multiple


def grow_vocab(model, rows):
    """model with `rows` token embeddings (and logits), its own first: the rows a vocabulary with
    new tokens needs (the chat format's, see chat_format.py). Each new row is the mean of the old
    ones plus N(0, 0.02) noise (GPT-2's init std): an average token, whose logit under the tied
    head is the mean of the old ones' (h . mean(E) = mean(h . E)), so it starts unlikely rather
    than at a random logit, and each a little different, so that the new tokens are told apart
    from the start (Hewitt 2021, "Initializing new word embeddings for pretrained language
    models"). The old tokens' logits do not change."""
    old = model.config.vocab_size
    noise = 0.02 * torch.randn(rows - old, model.config.n_embd,
                               generator=torch.Generator().manual_seed(0))
    state = model.state_dict()
    for key in ('transformer.wte.weight', 'lm_head.weight'):  # the same tensor for a tied head
        w = state[key]
        state[key] = torch.cat([w, (w.mean(0) + noise).to(w.dtype)])
    return GPT.from_state_dict(replace(model.config, vocab_size=rows), state)


def init_model(cfg, vocab, vocab_size, verbose=True, data_sha256=None, device='cpu'):
    """The model a training run starts from, on the CPU, and the checkpoint it resumes (else None):
    cfg.init_from='scratch' (a new GPT of cfg's shape), 'resume' (out_dir/ckpt.pt, checked against
    cfg), a GPT-2 (OpenAI's name or a Hugging Face folder) or a checkpoint of ours (a .pt file or
    an out_dir) to finetune, its context cropped to cfg.block_size, with LoRA adapters when
    cfg.lora_rank > 0. vocab is the dataset's spec (None for random tokens); vocab_size the model's
    embedding rows; data_sha256 the dataset's val.bin hash, which a resumed run's must match."""
    say = print if verbose else (lambda *a, **k: None)
    if cfg.init_from == 'scratch':
        padded = padded_vocab_size(vocab_size)
        say(f"initialising a new model, vocab_size {vocab_size}"
            + (f" padded to {padded}" if padded > vocab_size else ''))
        config = GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS}, vocab_size=padded)
        with torch.device('meta'):  # count the parameters before allocating them
            n_params = GPT(config).get_num_params(non_embedding=False)
        # where it will train; with LoRA (bench.py adapts random models) only the weights
        check_memory(n_params, device, 4 if cfg.lora_rank else 16)
        return adapt(GPT(config), cfg, say), None
    if cfg.init_from == 'resume':
        path = os.path.join(cfg.out_dir, 'ckpt.pt')
        ckpt = load_checkpoint(path)
        check_schema(ckpt, path)
        missing = {'optimizer', 'scaler', 'config', 'iter_num', 'best_val_loss', 'rng'} - set(ckpt)
        if missing:
            raise UserError(f"{path} cannot be resumed: it has no {', '.join(sorted(missing))} "
                            "(a checkpoint for sampling only?)")
        if ckpt['vocab'] != vocab:
            raise UserError(f"{path} was trained with another vocabulary than dataset "
                            f"'{cfg.dataset}': resume with --dataset={ckpt['config']['dataset']!r} "
                            "(or its data_dir)")
        # Compare with the run config the checkpoint was trained with, not its model_args:
        # a run started from GPT-2 took its shape from the pretrained model,
        # whatever n_layer etc. it was given.
        defaults = type(cfg)()  # for keys older checkpoints did not have yet
        # all but the dropouts, which may change
        for key in (*(k for k in MODEL_KEYS if k != 'dropout'), 'optimizer', 'lora_rank',
                    'lora_alpha', 'lora_targets'):
            trained, asked = ckpt['config'].get(key, getattr(defaults, key)), getattr(cfg, key)
            if trained != asked:
                why = (f" (it learned positions for {trained} tokens only)"
                       if key == 'block_size' else '')
                raise UserError(f"{path} has {key}={trained!r} but this run asks for "
                                f"{asked!r}{why}: resume with --{key}={trained!r}")
        if ckpt['iter_num'] >= cfg.max_iters and not cfg.eval_only:
            raise UserError(f"{path} is at iter {ckpt['iter_num']}, max_iters is {cfg.max_iters}: "
                            "nothing to train; raise --max_iters "
                            "(or evaluate it with --eval_only=True)")
        bad = [k for k, v in ckpt['model'].items()
               if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise UserError(f"{path} holds weights that are not finite ({bad[0]}): the run it "
                            "saved had diverged; resume from ckpt_prev.pt (rename it to ckpt.pt)")
        if ckpt.get('data_sha256') and data_sha256 and ckpt['data_sha256'] != data_sha256:
            raise UserError(f"{path} was trained on other data than dataset '{cfg.dataset}' (its "
                            "val.bin differs), so their losses do not compare: resume with "
                            f"--dataset={ckpt['config']['dataset']!r} (or its data_dir), or start "
                            "a new run in another out_dir")
        say(f"resuming from {path} at step {ckpt['iter_num']} "
            f"(best val loss {ckpt['best_val_loss']:.4f})")
        return model_from_checkpoint(ckpt, dropout=cfg.dropout), ckpt
    path = checkpoint_file(cfg.init_from)
    if path:  # a model trained here, to finetune
        ckpt = load_checkpoint(path)
        check_schema(ckpt, path)
        if not same_token_ids(ckpt['vocab'], vocab):
            raise UserError(f"{path} was trained with another vocabulary than dataset "
                            f"'{cfg.dataset}' ({ckpt['vocab']['kind']} vs {vocab['kind']}): "
                            "finetune it on data prepared with its tokenizer")
        # a LoRA run's adapters are folded in: the finetune starts from the model it sampled
        model = merge_lora(model_from_checkpoint(ckpt, dropout=cfg.dropout))
        source = f"{path} (iter {ckpt.get('iter_num', '?')})"
    else:
        if not same_token_ids(GPT2_VOCAB, vocab):
            raise UserError(f"init_from={cfg.init_from!r} reads GPT-2's BPE, but dataset "
                            f"'{cfg.dataset}' has a {vocab['kind']} vocabulary: "
                            "use a GPT-2 BPE dataset such as shakespeare or openwebtext")
        model = from_pretrained(cfg.init_from, dropout=cfg.dropout)
        source = f"OpenAI's GPT-2 weights: {cfg.init_from}"
    if cfg.block_size > model.config.block_size:
        raise UserError(f"{cfg.init_from} has {model.config.block_size} positions, fewer than "
                        f"block_size {cfg.block_size}: "
                        f"use --block_size={model.config.block_size} or less")
    n_special = len(vocab.get('special', ()))  # tokens above the base vocabulary (chat_format)
    if model.config.vocab_size < vocab_size - n_special:
        raise UserError(f"{cfg.init_from} has {model.config.vocab_size} token embeddings, "
                        f"fewer than the dataset's {vocab_size - n_special} tokens")
    if model.config.vocab_size < vocab_size:  # e.g. OpenAI's 50257: no rows for special tokens
        model = grow_vocab(model, padded_vocab_size(vocab_size))
    model.crop_block_size(cfg.block_size)
    say(f"initialising from {source}, {model.get_num_params() / 1e6:.2f}M parameters, "
        f"block_size {cfg.block_size}")
    return adapt(model, cfg, say), None


def adapt(model, cfg, say):
    """The model with LoRA adapters when cfg.lora_rank > 0 (and the rest frozen)."""
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {trainable:,} trainable "
            f"parameters ({100 * trainable / model.get_num_params(False):.2f}%), the rest frozen")
    return model


def checkpoint_file(init_from):
    """The checkpoint of ours that init_from names: a .pt file, or a run's out_dir (its best.pt,
    what sample.py reads, else its ckpt.pt); None for anything else (a GPT-2 name or HF folder)."""
    if os.path.isfile(init_from):
        return init_from
    for name in ('best.pt', 'ckpt.pt'):
        if os.path.isfile(os.path.join(init_from, name)):
            return os.path.join(init_from, name)
    return None


def same_token_ids(a, b):
    """Whether every token id of vocabulary spec a means the same in spec b: the same base
    vocabulary, and a's special tokens the first of b's (tokens added above its ids, such as the
    chat format's, change none of them)."""
    def base(spec):
        return {k: v for k, v in spec.items() if k != 'special'}
    special = a.get('special', [])
    return base(a) == base(b) and b.get('special', [])[:len(special)] == special


def load_model(init_from='resume', out_dir='out', ckpt_name='best.pt'):
    """A model to sample or evaluate, in eval mode without dropout, on the CPU, in fp32, with its
    tokenizer and its checkpoint dict: from out_dir/ckpt_name (init_from='resume'; an absolute
    ckpt_name reads one from elsewhere), or OpenAI's GPT-2 / a Hugging Face folder
    (checkpoint None)."""
    if init_from == 'resume':
        path = os.path.join(out_dir, ckpt_name)
        ckpt = load_checkpoint(path)
        check_schema(ckpt, path)
        tokenizer = Tokenizer(ckpt['vocab'])
        model = model_from_checkpoint(ckpt, dropout=0.0, vocab_size=tokenizer.vocab_size)
        return merge_lora(model).eval(), tokenizer, ckpt
    return from_pretrained(init_from, dropout=0.0).eval(), Tokenizer(GPT2_VOCAB), None


# --------------------------------------------------------------------------------------------------
# out_dir: one run at a time, and its metrics log

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


def read_metrics(path):
    """The rows of a metrics.jsonl. A line that is not JSON (a crash or a full disk mid-write
    leaves half a line) is dropped, and said, rather than ending the resume or plot reading it."""
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
