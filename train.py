"""
Train a GPT: from scratch, resumed from out_dir/ckpt.pt, or finetuned from OpenAI's GPT-2.

CPU or one GPU (the device is picked automatically; see configurator.py):
    python train.py config/train_shakespeare_char_cpu.py
    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False
Several GPUs on one node, with DistributedDataParallel:
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
Several nodes (run on each, with its --node_rank):
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=1234 train.py ...
Finetune OpenAI's GPT-2 (init_from='gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local HF folder):
    python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare.py
Continue a run from out_dir/ckpt.pt, exactly as if it had never stopped: the same command plus
    --init_from=resume

Stopping: SIGINT (Ctrl-C) or SIGTERM (what schedulers send before they preempt a job) lets the
current step finish, saves ckpt.pt (not best.pt: there is no evaluation on the way out, so it may be
short) and exits with status 128 + the signal's number (130, 143), the status of a process the signal
killed: a scheduler or a shell `&&` chain sees a run that did not finish, where 0 would tell them it
did. A second signal acts as usual (quits at once). A loss that is not finite (nan, inf) stops the run
at once, without saving, with status 2: the last checkpoint is the last good model.
"""

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, FORMAT_VERSION
from configurator import (UserError, autocast_context, cli, peak_flops, print_config, resolve_compile,
                          resolve_device, resolve_dtype)
from model import GPT, GPT2_NAMES, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = 'out'
    eval_interval: int = 2000  # steps between evaluations (and checkpoints)
    log_interval: int = 1  # steps between log lines
    eval_iters: int = 200  # batches per split in each loss estimate
    eval_only: bool = False  # evaluate once and exit
    eval_at_start: bool = True  # also evaluate the untrained model at step 0 (False saves that time in a race)
    always_save_checkpoint: bool = True  # save at every eval, not only when val loss improves
    init_from: str = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt), or OpenAI's GPT-2 to finetune:
    # 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local Hugging Face GPT-2 folder (its shape wins
    # over n_layer, n_head, n_embd, bias; block_size crops its 1024 positions)
    seed: int = 1337  # seeds the initialisation, the batches and dropout
    # Weights & Biases (optional: pip install wandb)
    wandb_log: bool = False
    wandb_project: str = 'owt'
    wandb_run_name: str = 'gpt2'
    # data
    dataset: str = 'openwebtext'  # a folder under data/ made by its prepare.py
    data_dir: str = ''  # read the dataset from here instead of data/<dataset>
    gradient_accumulation_steps: int = 5 * 8  # micro-steps per step, over all processes together
    batch_size: int = 12  # sequences per micro-step per process
    block_size: int = 1024  # context length in tokens
    # model
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining, 0.1+ for finetuning
    bias: bool = False  # biases in Linears and LayerNorms (GPT-2 had them)
    # modern options, all off by default: GPT-2's architecture (see model.py's GPTConfig)
    rotary: bool = False  # rotary position embeddings instead of learned ones
    rmsnorm: bool = False  # RMSNorm instead of LayerNorm
    qk_norm: bool = False  # RMS-normalise queries and keys per head
    relu2: bool = False  # ReLU^2 MLP instead of GELU
    tie_weights: bool = True  # share the token embedding with the head
    # optimizer: 'adamw', or 'muon' (Muon for the blocks' matrices, AdamW for embeddings, head, gains, biases)
    optimizer: str = 'adamw'
    muon_lr: float = 0.02  # Muon's peak learning rate (it follows the same schedule as learning_rate)
    muon_momentum: float = 0.95
    # AdamW
    learning_rate: float = 6e-4  # peak learning rate
    max_iters: int = 600000  # optimizer steps in the whole run
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm at this; 0 disables
    # learning-rate schedule: linear warm-up, then cosine decay to min_lr
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000  # ~= max_iters, per Chinchilla
    min_lr: float = 6e-5  # ~= learning_rate / 10, per Chinchilla
    # system
    backend: str = 'auto'  # torch.distributed backend under torchrun: 'auto' = nccl on CUDA, gloo on CPU
    device: str = 'auto'  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str = 'auto'  # 'auto' (bf16 on CUDA with bf16, else fp16 on CUDA, else fp32), 'float32', 'bfloat16', 'float16'
    compile: bool | str = 'auto'  # torch.compile the model: 'auto' = on CUDA only


MODERN_KEYS = ('rotary', 'rmsnorm', 'qk_norm', 'relu2', 'tie_weights')
MODEL_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', *MODERN_KEYS, 'dropout')


def recorded_model_args(config):
    """The GPTConfig fields a checkpoint records: all, less the modern switches left at GPT-2's setting,
    so that a GPT-2 run's model_args read as they always did."""
    gpt2 = GPTConfig()
    return {k: v for k, v in asdict(config).items() if k not in MODERN_KEYS or v != getattr(gpt2, k)}


def get_lr(it, cfg):
    """Learning rate of step `it` (0-based)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        # linear warm-up from lr/(warmup+1) at step 0 (never 0: that step would be wasted) to lr
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    # cosine decay from learning_rate to min_lr (Loshchilov & Hutter 2017)
    decay_ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------------------------------
# data

def open_dataset(cfg):
    """The dataset's vocabulary spec and its splits as read-only memmaps of uint16 token ids."""
    import json
    data_dir = cfg.data_dir or os.path.join(REPO, 'data', cfg.dataset)
    prepare = os.path.join('data', cfg.dataset, 'prepare.py')
    meta_path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(meta_path):
        raise UserError(f"dataset '{cfg.dataset}' not found in {data_dir}: run `python {prepare}` first")
    with open(meta_path) as f:
        vocab = json.load(f)['vocab']
    splits = {}
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing: run `python {prepare}` again")
        data = np.memmap(path, dtype=np.uint16, mode='r') if os.path.getsize(path) else np.zeros(0, np.uint16)
        if len(data) <= cfg.block_size:
            raise UserError(f"the {split} split of '{cfg.dataset}' has {len(data)} tokens, too few for "
                            f"block_size {cfg.block_size}: use a smaller --block_size or more text")
        splits[split] = data
    return vocab, splits


def batch_seed(seed, split, index):
    """The generator seed of one batch: a function of (seed, split, index) only, so the data a step
    sees does not depend on how many processes share it, nor on whether the run was resumed."""
    return (seed * 4 + {'train': 0, 'val': 1, 'eval_train': 2, 'eval_val': 3}[split]) * 2**32 + index


def get_batch(data, block_size, batch_size, seed, rows=None, device='cpu'):
    """Inputs x and targets y (B, block_size) from random windows of `data`. The windows are drawn
    from torch.Generator(seed); `rows` picks a slice of them (a process's share of a step)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(len(data) - block_size, (batch_size,), generator=g).tolist()
    if rows is not None:
        offsets = offsets[rows]
    return get_windows(data, offsets, block_size, device)


def get_windows(data, offsets, block_size, device='cpu'):
    """Inputs x and targets y (len(offsets), block_size) of the windows of `data` starting at `offsets`
    (random ones in training, evaluation's sliding ones in eval.py)."""
    w = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in offsets]).astype(np.int64))
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()  # y is x shifted by one: each position predicts the next
    if device.startswith('cuda'):
        # pinned host memory lets the copy run asynchronously while the GPU works
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@torch.no_grad()
def estimate_loss(model, splits, cfg, device, ctx):
    """Mean loss over eval_iters batches per split. The batches are the same at every evaluation, so
    two evaluations differ only by the model."""
    out = {}
    model.eval()
    for split, data in splits.items():
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            X, Y = get_batch(data, cfg.block_size, cfg.batch_size, batch_seed(cfg.seed, 'eval_' + split, k),
                             device=device)
            with ctx:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def train_step(model, optimizer, scaler, ctx, X, Y, next_batch, accum, grad_clip, ddp=False):
    """One optimizer step over `accum` micro-batches, the first being (X, Y); next_batch(m) gives the m-th
    micro-batch after it. Returns the step's mean loss (a tensor: reading it would wait for the device)
    and the next step's first micro-batch. bench.py times this same function."""
    loss_sum = torch.zeros((), device=X.device)
    for micro in range(accum):
        if ddp:
            # DDP all-reduces gradients in backward; only the last micro-step needs it, the
            # earlier ones just add into .grad locally
            model.require_backward_grad_sync = micro == accum - 1
        with ctx:
            _, loss = model(X, Y)
            # the gradient of the step is that of the mean loss over all micro-steps
            loss = loss / accum
        # fetch the next micro-batch on the CPU while the device runs the forward pass
        X, Y = next_batch(micro + 1)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # frees the gradients' memory until the next backward
    return loss_sum, X, Y


# ----------------------------------------------------------------------------------------------------
# metrics log

def open_metrics(out_dir, start_iter):
    """out_dir/metrics.jsonl for appending, one JSON object per line. A resumed run keeps the rows up
    to the step it resumes from and drops later ones, which it is about to redo."""
    path = os.path.join(out_dir, 'metrics.jsonl')
    os.makedirs(out_dir, exist_ok=True)
    if start_iter == 0:
        return open(path, 'w')  # a new run, a new log
    if os.path.isfile(path):
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        keep = [line for line in lines if json.loads(line)['iter'] <= start_iter]
        if len(keep) < len(lines):
            with open(path + '.tmp', 'w') as f:
                f.writelines(keep)
            os.replace(path + '.tmp', path)
    return open(path, 'a')


def format_duration(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------------------------------
# random state, for exact resume

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
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------------------------------
# stopping early: on a signal, or when the loss is no longer a number

@contextmanager
def stop_signals():
    """While inside, a first SIGINT or SIGTERM no longer kills the process: its number is put in the
    yielded dict, for the loop to stop after the current step. A second one acts as it did before
    (Ctrl-C twice quits at once). The previous handlers are restored on the way out."""
    received = {'signal': 0}
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        received['signal'] = signum
        signal.signal(signum, previous[signum])

    for s in previous:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def step_verdict(loss_sum, signum, world_size):
    """(finite, signum) after a step, the same on every process: whether the loss was finite on all of
    them, and the stop signal any of them received (0: none). One device-to-host sync per step; under
    DDP also an all-reduce of two numbers, so that all processes stop at the same step."""
    flags = torch.stack([loss_sum.isfinite().logical_not().float(),
                         torch.tensor(float(signum), device=loss_sum.device)])
    if world_size > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    not_finite, signum = flags.tolist()
    return not not_finite, int(signum)


# ----------------------------------------------------------------------------------------------------

def check_config(cfg):
    for key in ('eval_interval', 'log_interval', 'eval_iters', 'gradient_accumulation_steps', 'batch_size',
                'block_size', 'n_layer', 'n_head', 'n_embd'):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.max_iters <= 0 and not cfg.eval_only:
        raise UserError(f"max_iters must be positive, got {cfg.max_iters} (to evaluate only, use --eval_only=True)")
    for key in ('warmup_iters', 'lr_decay_iters', 'grad_clip'):
        if getattr(cfg, key) < 0:
            raise UserError(f"{key} must be zero or more, got {getattr(cfg, key)}")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.init_from not in ('scratch', 'resume') and (cfg.rotary or cfg.rmsnorm or cfg.qk_norm or cfg.relu2
                                                       or not cfg.tie_weights):
        raise UserError(f"init_from={cfg.init_from!r} loads GPT-2's architecture: leave rotary, rmsnorm, qk_norm, "
                        "relu2 and tie_weights at their defaults")
    if cfg.optimizer not in ('adamw', 'muon'):
        raise UserError(f"optimizer must be 'adamw' or 'muon', got {cfg.optimizer!r}")
    if cfg.init_from not in ('scratch', 'resume', *GPT2_NAMES) and not os.path.isdir(cfg.init_from):
        raise UserError(f"init_from must be 'scratch', 'resume', one of {', '.join(GPT2_NAMES)} or a local "
                        f"Hugging Face GPT-2 folder, got {cfg.init_from!r}")


def main(cfg):
    check_config(cfg)
    # Under torchrun every process runs this; RANK is set by torchrun, LOCAL_RANK picks the GPU.
    ddp = 'RANK' in os.environ
    if ddp:
        import torch.distributed as dist
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
        device = resolve_device(cfg.device)
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != 'auto' else ('nccl' if device.startswith('cuda') else 'gloo')
        dist.init_process_group(backend=backend)
        if cfg.gradient_accumulation_steps % world_size:
            dist.destroy_process_group()
            raise UserError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be "
                            f"divisible by the number of processes ({world_size})")
    else:
        rank, world_size = 0, 1
        device = resolve_device(cfg.device)
    master = rank == 0
    try:
        with stop_signals() as received:  # SIGINT, SIGTERM: stop after the current step (see the docstring)
            return train(cfg, device, rank, world_size, master, received)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(cfg, device, rank, world_size, master, received):
    t_launch = time.perf_counter()
    if master:
        print_config(cfg)
    device_type = device.split(':')[0]
    dtype = resolve_dtype(cfg.dtype, device)
    use_compile = resolve_compile(cfg.compile, device)
    ctx = autocast_context(device, dtype)
    local_accum = cfg.gradient_accumulation_steps // world_size
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master:
        print(f"device {device}, dtype {dtype}, compile {use_compile}, {world_size} process(es); "
              f"{tokens_per_iter:,} tokens per step")
    torch.manual_seed(cfg.seed + rank)  # init is overwritten by rank 0's weights under DDP; dropout differs
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls and convs: ~free speed on Ampere+
        torch.backends.cudnn.allow_tf32 = True

    vocab, splits = open_dataset(cfg)
    from tokenizer import GPT2_VOCAB, Tokenizer
    vocab_size = Tokenizer(vocab).vocab_size

    model_args = dict({key: getattr(cfg, key) for key in MODEL_KEYS}, vocab_size=vocab_size)
    ckpt = None
    if cfg.init_from == 'scratch':
        if master:
            print(f"initialising a new model, vocab_size {vocab_size}")
        model = GPT(GPTConfig(**model_args))
        model_args = recorded_model_args(model.config)
        iter_num, best_val_loss = 0, float('inf')
    elif cfg.init_from == 'resume':
        ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
        ckpt = load_checkpoint(ckpt_path, device='cpu')
        if ckpt['vocab'] != vocab:
            raise UserError(f"{ckpt_path} was trained with another vocabulary than dataset '{cfg.dataset}': "
                            f"resume with --dataset={ckpt['config']['dataset']!r} (or its data_dir)")
        # Compare with the run config the checkpoint was trained with, not its model_args: a run started
        # from GPT-2 took its shape from the pretrained model, whatever n_layer etc. it was given.
        defaults = TrainConfig()  # for keys older checkpoints did not have yet
        for key in (*MODEL_KEYS[:-1], 'optimizer'):
            trained, asked = ckpt['config'].get(key, getattr(defaults, key)), getattr(cfg, key)
            if trained != asked:
                why = f" (it learned positions for {trained} tokens only)" if key == 'block_size' else ''
                raise UserError(f"{ckpt_path} has {key}={trained!r} but this run asks for {asked!r}{why}: "
                                f"resume with --{key}={trained!r}")
        model = model_from_checkpoint(ckpt, dropout=cfg.dropout)
        model_args = recorded_model_args(model.config)  # the checkpoint's shape, which may be GPT-2's
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        if iter_num >= cfg.max_iters and not cfg.eval_only:
            raise UserError(f"{ckpt_path} is at iter {iter_num}, max_iters is {cfg.max_iters}: nothing to train; "
                            "raise --max_iters (or evaluate it with --eval_only=True)")
        if master:
            print(f"resuming from {ckpt_path} at step {iter_num} (best val loss {best_val_loss:.4f})")
    else:
        if vocab != GPT2_VOCAB:
            raise UserError(f"init_from={cfg.init_from!r} reads GPT-2's BPE, but dataset '{cfg.dataset}' has a "
                            f"{vocab['kind']} vocabulary: use a GPT-2 BPE dataset such as shakespeare or openwebtext")
        model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
        if cfg.block_size > model.config.block_size:
            raise UserError(f"{cfg.init_from} has {model.config.block_size} positions, fewer than block_size "
                            f"{cfg.block_size}: use --block_size={model.config.block_size} or less")
        if model.config.vocab_size < vocab_size:
            raise UserError(f"{cfg.init_from} has {model.config.vocab_size} token embeddings, fewer than GPT-2's "
                            f"{vocab_size}: it is not a GPT-2 BPE model")
        model.crop_block_size(cfg.block_size)
        model_args = recorded_model_args(model.config)  # what the checkpoint records, so resume and sampling rebuild it
        iter_num, best_val_loss = 0, float('inf')
        if master:
            print(f"initialising from OpenAI's GPT-2 weights: {cfg.init_from}, {model.get_num_params() / 1e6:.2f}M "
                  f"parameters, block_size {cfg.block_size}")
    model.to(device)

    # A GradScaler only for fp16, whose narrow range would flush small gradients to zero.
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type,
                                           cfg.optimizer, cfg.muon_lr, cfg.muon_momentum)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt['rng'])
        if rank:
            torch.manual_seed(cfg.seed + rank + iter_num)  # other ranks' dropout streams, freshly drawn
        ckpt = None  # free the memory

    raw_model = model  # what is saved: never the compiled or DDP-wrapped module
    if use_compile:
        if master:
            print("compiling the model... (takes a minute)")
        model = torch.compile(model)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[int(device.split(':')[1])] if device_type == 'cuda' else None)

    wandb = None
    if cfg.wandb_log and master:
        try:
            import wandb
        except ImportError:
            raise UserError("wandb_log=True needs Weights & Biases: pip install wandb") from None
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
    metrics = open_metrics(cfg.out_dir, iter_num) if master and not cfg.eval_only else None

    def log(**row):
        # one row of metrics.jsonl (and of wandb): the step, tokens seen so far, the values, wall time
        row = {'iter': iter_num, 'tokens': iter_num * tokens_per_iter, **row, 'time': round(time.time(), 3)}
        if metrics:
            metrics.write(json.dumps(row) + '\n')
            metrics.flush()
        if wandb:
            wandb.log(row, step=iter_num)

    def batch(step, micro):
        # this process's micro-step `micro` of step `step`: rows of the step's global batch
        first = (rank * local_accum + micro) * cfg.batch_size
        return get_batch(splits['train'], cfg.block_size, cfg.gradient_accumulation_steps * cfg.batch_size,
                         batch_seed(cfg.seed, 'train', step), rows=slice(first, first + cfg.batch_size),
                         device=device)

    def checkpoint(is_best):
        save_checkpoint({
            'format_version': FORMAT_VERSION, 'model': raw_model.state_dict(),
            'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(), 'model_args': model_args,
            'config': asdict(cfg), 'iter_num': iter_num, 'best_val_loss': best_val_loss, 'vocab': vocab,
            'rng': rng_state()}, cfg.out_dir, is_best)

    peak = peak_flops(device, dtype) if master else 0.0
    start_iter = iter_num
    X, Y = batch(iter_num, 0)  # the first batch; later ones are fetched while the device computes
    t_log, iters_logged, mfu, dt_avg = time.perf_counter(), 0, -1.0, None
    losses = {}  # of the last evaluation
    stop_signal = 0  # a SIGINT/SIGTERM that some process received by the end of the last step
    while True:
        # Evaluate (and save) every eval_interval steps and always after the last step. A resumed
        # run skips its first evaluation: the checkpoint it came from was just evaluated.
        last = iter_num >= cfg.max_iters
        saved = False
        resumed_here = cfg.init_from == 'resume' and iter_num == start_iter
        skip_start = iter_num == 0 and not cfg.eval_at_start
        if last or cfg.eval_only or (iter_num % cfg.eval_interval == 0 and not resumed_here and not skip_start):
            losses = estimate_loss(model, splits, cfg, device, ctx)
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                      f"{time.perf_counter() - t_launch:.1f} s since start", flush=True)
                log(eval_train_loss=losses['train'], val_loss=losses['val'])
            is_best = losses['val'] < best_val_loss
            if not cfg.eval_only and iter_num > start_iter and (is_best or cfg.always_save_checkpoint):
                if is_best:
                    best_val_loss = losses['val']  # only ever goes down: it is the loss of best.pt
                if master:
                    checkpoint(is_best)
                    print(f"saved checkpoint to {cfg.out_dir}" + (" (new best)" if is_best else ""))
                saved = True
            t_log = time.perf_counter()  # evaluation time doesn't count as training time
        if last or cfg.eval_only:
            break
        if stop_signal:  # a graceful stop: ckpt.pt gets this step (best.pt moves only at evaluations)
            if master:
                if not saved:
                    checkpoint(is_best=False)
                print(f"stopped by {signal.Signals(stop_signal).name} at iter {iter_num}, saved to "
                      f"{os.path.join(cfg.out_dir, 'ckpt.pt')}; to continue, run the same command with "
                      "--init_from=resume", flush=True)
            break

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)  # Muon's groups have their own peak
        # micro-step m after this step's first is micro-batch m % local_accum of step iter_num + m // local_accum
        next_batch = lambda m: batch(iter_num + m // local_accum, m % local_accum)  # noqa: E731
        loss_sum, X, Y = train_step(model, optimizer, scaler, ctx, X, Y, next_batch, local_accum, cfg.grad_clip,
                                    ddp=world_size > 1)
        iter_num += 1
        iters_logged += 1
        # Before this step's weights can reach a checkpoint: was its loss finite, was a stop asked for?
        finite, stop_signal = step_verdict(loss_sum, received['signal'], world_size)
        if not finite:
            # Stop, not skip: a non-finite loss means the learning rate, the data or the precision is
            # wrong, and the weights and AdamW's moments have already taken the nan/inf in.
            raise UserError(f"the loss is not finite at iter {iter_num} (lr {lr:.2e}): the run diverged and "
                            f"stopped without saving, so {os.path.join(cfg.out_dir, 'ckpt.pt')} (if any) is "
                            "the last good state: lower --learning_rate, then resume or restart")

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            if world_size > 1:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            lossf = loss_sum.item()  # .item() waits for the device, so the clock below is honest
            dt = (time.perf_counter() - t_log) / iters_logged
            t_log, iters_logged = time.perf_counter(), 0
            if master:
                if iter_num - start_iter > 5:  # leave warm-up (and compilation) steps out of the MFU
                    step_mfu = raw_model.estimate_mfu(tokens_per_iter, dt, peak)
                    mfu = step_mfu if mfu < 0 else 0.9 * mfu + 0.1 * step_mfu
                dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
                eta = (cfg.max_iters - iter_num) * dt_avg  # evaluations not counted
                print(f"iter {iter_num}/{cfg.max_iters} ({100 * iter_num / max(cfg.max_iters, 1):.0f}%): "
                      f"loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, {tokens_per_iter / dt:,.0f} tok/s, "
                      f"mfu {max(mfu, 0) * 100:.1f}%, eta {format_duration(eta)}", flush=True)  # shows in `| tee` too
                log(train_loss=lossf, lr=lr, ms_per_iter=round(dt * 1000, 3), mfu=round(max(mfu, 0), 5))
    if metrics:
        metrics.close()
    if wandb:
        wandb.finish()
    return {'iter_num': iter_num, 'best_val_loss': best_val_loss, 'losses': losses,
            'stop_signal': 0 if last else stop_signal}


if __name__ == '__main__':
    result = cli(main, TrainConfig)
    sys.exit(128 + result['stop_signal'] if result['stop_signal'] else 0)  # why 128+: see the docstring
