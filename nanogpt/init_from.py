"""
The model a training run starts from, by cfg.init_from: 'scratch' (a new GPT of cfg's shape),
'resume' (out_dir/ckpt.pt, checked against cfg), a GPT-2 (OpenAI's name or a Hugging Face folder)
or a checkpoint of ours (a .pt file or an out_dir) to finetune; with LoRA adapters when
cfg.lora_rank > 0. Each is its own function; init_model picks one.
"""

import os
from dataclasses import fields, replace

import torch

from model import GPT, GPTConfig
from nanogpt.checkpoint import check_schema, load_checkpoint, model_from_checkpoint
from nanogpt.device import check_memory
from nanogpt.errors import UserError
from nanogpt.hf import from_pretrained
from nanogpt.lora import apply_lora, merge_lora
from nanogpt.tokenizer import GPT2_VOCAB, padded_vocab_size

# the GPTConfig fields a training config sets (vocab_size comes from the dataset)
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name != 'vocab_size')


def init_model(cfg, vocab, vocab_size, verbose=True, data_sha256=None, device='cpu'):
    """(model on the CPU, the checkpoint it resumes or None). vocab is the dataset's spec (None for
    random tokens); vocab_size the model's embedding rows; data_sha256 the dataset's val.bin hash,
    which a resumed run's must match; device where it will train (for the memory check)."""
    say = print if verbose else (lambda *a, **k: None)
    if cfg.init_from == 'scratch':
        return adapt(from_scratch(cfg, vocab_size, device, say), cfg, say), None
    if cfg.init_from == 'resume':
        return resume(cfg, vocab, data_sha256, say)
    return adapt(finetune(cfg, vocab, vocab_size, say), cfg, say), None


def from_scratch(cfg, vocab_size, device, say):
    padded = padded_vocab_size(vocab_size)
    say(f"initialising a new model, vocab_size {vocab_size}"
        + (f" padded to {padded}" if padded > vocab_size else ''))
    config = GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS}, vocab_size=padded)
    with torch.device('meta'):  # count the parameters before allocating them
        n_params = GPT(config).get_num_params(non_embedding=False)
    # where it will train; with LoRA (bench.py adapts random models) only the weights
    check_memory(n_params, device, 4 if cfg.lora_rank else 16)
    return GPT(config)


def resume(cfg, vocab, data_sha256, say):
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    ckpt = load_checkpoint(path)
    check_schema(ckpt, path)
    check_resumable(ckpt, path, cfg, vocab, data_sha256)
    say(f"resuming from {path} at step {ckpt['iter_num']} "
        f"(best val loss {ckpt['best_val_loss']:.4f})")
    return model_from_checkpoint(ckpt, dropout=cfg.dropout), ckpt


def check_resumable(ckpt, path, cfg, vocab, data_sha256):
    """Refuse, in one line, a checkpoint this run cannot continue exactly."""
    missing = {'optimizer', 'scaler', 'config', 'iter_num', 'best_val_loss', 'rng'} - set(ckpt)
    if missing:
        raise UserError(f"{path} cannot be resumed: it has no {', '.join(sorted(missing))} "
                        "(a checkpoint for sampling only?)")
    trained_on = f"--dataset={ckpt['config']['dataset']!r} (or its data_dir)"
    if ckpt['vocab'] != vocab:
        raise UserError(f"{path} was trained with another vocabulary than dataset "
                        f"'{cfg.dataset}': resume with {trained_on}")
    # Compare with the run config the checkpoint was trained with, not its model_args: a run
    # started from GPT-2 took its shape from the pretrained model, whatever n_layer it was given.
    defaults = type(cfg)()  # for keys older checkpoints did not have yet
    for key in (*(k for k in MODEL_KEYS if k != 'dropout'), 'optimizer', 'lora_rank',
                'lora_alpha', 'lora_targets'):  # all but the dropouts, which may change
        trained, asked = ckpt['config'].get(key, getattr(defaults, key)), getattr(cfg, key)
        if trained != asked:
            why = (f" (it learned positions for {trained} tokens only)"
                   if key == 'block_size' else '')
            raise UserError(f"{path} has {key}={trained!r} but this run asks for {asked!r}{why}: "
                            f"resume with --{key}={trained!r}")
    if ckpt['iter_num'] >= cfg.max_iters and not cfg.eval_only:
        raise UserError(f"{path} is at iter {ckpt['iter_num']}, max_iters is {cfg.max_iters}: "
                        "nothing to train; raise --max_iters "
                        "(or evaluate it with --eval_only=True)")
    bad = [k for k, v in ckpt['model'].items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise UserError(f"{path} holds weights that are not finite ({bad[0]}): the run it saved "
                        "had diverged; resume from ckpt_prev.pt (rename it to ckpt.pt)")
    if ckpt.get('data_sha256') and data_sha256 and ckpt['data_sha256'] != data_sha256:
        raise UserError(f"{path} was trained on other data than dataset '{cfg.dataset}' (its "
                        f"val.bin differs), so their losses do not compare: resume with "
                        f"{trained_on}, or start a new run in another out_dir")


def finetune(cfg, vocab, vocab_size, say):
    """A model trained here or a GPT-2, its context cropped to cfg.block_size, its vocabulary grown
    for tokens the dataset adds (the chat format's)."""
    path = checkpoint_file(cfg.init_from)
    if path:  # a model trained here
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
    return model


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
