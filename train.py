"""
Train a GPT: from scratch, or resumed from out_dir/ckpt.pt.

CPU or one GPU (the device is picked automatically; see configurator.py):
    python train.py config/train_shakespeare_char_cpu.py
    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False
Several GPUs on one node, with DistributedDataParallel:
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
Several nodes (run on each, with its --node_rank):
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=1234 train.py ...
"""

import math
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, FORMAT_VERSION
from configurator import (UserError, autocast_context, cli, peak_flops, print_config, resolve_compile,
                          resolve_device, resolve_dtype)
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = 'out'
    eval_interval: int = 2000  # steps between evaluations (and checkpoints)
    log_interval: int = 1  # steps between log lines
    eval_iters: int = 200  # batches per split in each loss estimate
    eval_only: bool = False  # evaluate once and exit
    always_save_checkpoint: bool = True  # save at every eval, not only when val loss improves
    init_from: str = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
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


MODEL_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'dropout')


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

def check_config(cfg):
    for key in ('eval_interval', 'log_interval', 'eval_iters', 'gradient_accumulation_steps', 'batch_size',
                'block_size', 'n_layer', 'n_head', 'n_embd'):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in ('max_iters', 'warmup_iters', 'lr_decay_iters'):
        if getattr(cfg, key) < 0:
            raise UserError(f"{key} must be zero or more, got {getattr(cfg, key)}")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.init_from not in ('scratch', 'resume'):
        raise UserError(f"init_from must be 'scratch' or 'resume', got {cfg.init_from!r}")


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
        return train(cfg, device, rank, world_size, master)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(cfg, device, rank, world_size, master):
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
    from tokenizer import Tokenizer
    vocab_size = Tokenizer(vocab).vocab_size

    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                      bias=cfg.bias, vocab_size=vocab_size, dropout=cfg.dropout)
    ckpt = None
    if cfg.init_from == 'scratch':
        if master:
            print(f"initialising a new model, vocab_size {vocab_size}")
        model = GPT(GPTConfig(**model_args))
        iter_num, best_val_loss = 0, float('inf')
    else:
        ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
        ckpt = load_checkpoint(ckpt_path, device='cpu')
        for key in (*MODEL_KEYS[:-1], 'vocab_size'):
            if ckpt['model_args'][key] != model_args[key]:
                raise UserError(f"{ckpt_path} has {key}={ckpt['model_args'][key]!r} but this run asks for "
                                f"{model_args[key]!r}: resume with the checkpoint's settings")
        if ckpt['vocab'] != vocab:
            raise UserError(f"{ckpt_path} was trained with another vocabulary than dataset '{cfg.dataset}'")
        model = model_from_checkpoint(ckpt, dropout=cfg.dropout)
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        if master:
            print(f"resuming from {ckpt_path} at step {iter_num} (best val loss {best_val_loss:.4f})")
    model.to(device)

    # A GradScaler only for fp16, whose narrow range would flush small gradients to zero.
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
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
    t_log, iters_logged, mfu = time.perf_counter(), 0, -1.0
    while True:
        # Evaluate (and save) every eval_interval steps and always after the last step. A resumed
        # run skips its first evaluation: the checkpoint it came from was just evaluated.
        last = iter_num >= cfg.max_iters
        if last or cfg.eval_only or (iter_num % cfg.eval_interval == 0 and iter_num != start_iter):
            losses = estimate_loss(model, splits, cfg, device, ctx)
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                      f"{time.perf_counter() - t_launch:.1f} s since start")
                if wandb:
                    wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'],
                               'lr': get_lr(iter_num, cfg)})
            is_best = losses['val'] < best_val_loss
            if not cfg.eval_only and iter_num > start_iter and (is_best or cfg.always_save_checkpoint):
                if is_best:
                    best_val_loss = losses['val']  # only ever goes down: it is the loss of best.pt
                if master:
                    checkpoint(is_best)
                    print(f"saved checkpoint to {cfg.out_dir}" + (" (new best)" if is_best else ""))
            t_log = time.perf_counter()  # evaluation time doesn't count as training time
        if last or cfg.eval_only:
            break

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(local_accum):
            if world_size > 1:
                # DDP all-reduces gradients in backward; only the last micro-step needs it, the
                # earlier ones just add into .grad locally
                model.require_backward_grad_sync = micro == local_accum - 1
            with ctx:
                _, loss = model(X, Y)
                # the gradient of the step is that of the mean loss over all micro-steps
                loss = loss / local_accum
            # fetch the next micro-batch on the CPU while the device runs the forward pass
            X, Y = batch(iter_num + (micro + 1) // local_accum, (micro + 1) % local_accum)
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip != 0.0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)  # frees the gradients' memory until the next backward
        iter_num += 1
        iters_logged += 1

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
                print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
                      f"{tokens_per_iter / dt:,.0f} tok/s, mfu {max(mfu, 0) * 100:.1f}%")
    return {'iter_num': iter_num, 'best_val_loss': best_val_loss, 'losses': losses}


if __name__ == '__main__':
    cli(main, TrainConfig)
