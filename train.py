r"""
Train a GPT: from scratch, resumed from out_dir/ckpt.pt, or finetuned from OpenAI's GPT-2.

CPU or one GPU (the device is picked automatically; see device.py):
    python train.py config/train_shakespeare_char_cpu.py
    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False
Several GPUs on one node, with DistributedDataParallel:
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
Several nodes (run on each, with its --node_rank):
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=1234 \
        train.py ...
Finetune OpenAI's GPT-2 (init_from='gpt2' ... 'gpt2-xl', or a local HF folder):
    python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare.py
Continue a run from out_dir/ckpt.pt, exactly as if it had never stopped: the same command plus
    --init_from=resume

Stopping: SIGINT (Ctrl-C) or SIGTERM (what schedulers send before they preempt a job) lets the
current step finish, saves ckpt.pt (not best.pt: there is no evaluation on the way out, so it may be
short) and exits with status 128 + the signal's number (130, 143), the status of a process the
signal killed: a scheduler or a shell `&&` chain sees a run that did not finish, where 0 would tell
them it did. A second signal acts as usual (quits at once). A loss that is not finite (nan, inf)
stops the run at once, without saving, with status 2: the last checkpoint is the last good model.
"""

import datetime
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from configurator import cli, print_config
from model import MODERN_SWITCHES
from nanogpt.checkpoint import build_checkpoint, restore_training, save_checkpoint
from nanogpt.dataset import estimate_loss, open_dataset, train_batches, val_sha256
from nanogpt.device import peak_flops, peak_memory, reset_peak_memory, resolve_device, setup
from nanogpt.errors import UserError
from nanogpt.hf import GPT2_NAMES
from nanogpt.init_from import checkpoint_file, init_model
from nanogpt.lora import parse_targets
from nanogpt.multiple_choice import accuracy, load_items
from nanogpt.optimizers import configure_optimizers
from nanogpt.parallel import place, wrap
from nanogpt.run_dir import MetricsLog, claim_out_dir
from nanogpt.tokenizer import Tokenizer


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = 'out'
    eval_interval: int = 2000  # steps between evaluations (and checkpoints)
    log_interval: int = 1  # steps between log lines
    eval_iters: int = 200  # batches per split in each loss estimate
    eval_only: bool = False  # evaluate once and exit
    # a multiple-choice set scored at every evaluation, its mc_acc and mc_acc_norm logged beside
    # the val loss: data/hellaswag/val.jsonl (python data/hellaswag/prepare.py), or '' for none
    mc_eval_file: str = ''
    # also evaluate the untrained model at step 0 (False saves that time in a race)
    eval_at_start: bool = True
    always_save_checkpoint: bool = True  # save at every eval, not only when val loss improves
    overwrite: bool = False  # a new run may replace the run already in out_dir
    # keep the checkpoint before the latest as ckpt_prev.pt (False: one checkpoint less on disk)
    keep_prev_checkpoint: bool = True
    # 'scratch', 'resume' (from out_dir/ckpt.pt), or a model to finetune: OpenAI's GPT-2 ('gpt2',
    # 'gpt2-medium', 'gpt2-large', 'gpt2-xl'), a local Hugging Face GPT-2 folder, or one trained
    # here (a .pt file, or a run's out_dir: its best.pt). Its shape wins over n_layer, n_head,
    # n_embd, bias and the modern switches; block_size crops its positions.
    init_from: str = 'scratch'
    seed: int = 1337  # seeds the initialisation, the batches and dropout
    # Weights & Biases (optional: pip install -e .[wandb])
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
    # LoRA (lora.py): train a low-rank update of each target matrix, the model frozen; needs an
    # init_from to finetune. 0 = off, full finetuning
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # on the adapters' input
    # which Linears of each block: attn.c_attn (q, k, v), attn.c_proj, mlp.c_fc, mlp.c_proj, 'all'
    lora_targets: str = 'attn.c_attn,attn.c_proj'
    # optimizer: 'adamw', or 'muon'
    # (Muon for the blocks' matrices, AdamW for embeddings, head, gains, biases)
    optimizer: str = 'adamw'
    muon_lr: float = 0.02  # Muon's peak learning rate (it follows learning_rate's schedule)
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
    # torch.distributed backend under torchrun: 'auto' = nccl on CUDA, gloo on CPU
    backend: str = 'auto'
    # under torchrun: 'ddp' (a whole copy of the model per process) or 'fsdp' (parameters,
    # gradients and optimizer state sharded across processes: see parallel.py)
    parallelism: str = 'ddp'
    device: str = 'auto'  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    # 'float32', 'bfloat16', 'float16', or 'auto':
    # bf16 on CUDA with bf16, else fp16 on CUDA, else fp32
    dtype: str = 'auto'
    compile: bool | str = 'auto'  # torch.compile the model: 'auto' = on CUDA only
    # recompute each block's activations in the backward pass instead of keeping them: ~1/3 more
    # compute, activation memory of one block instead of n_layer
    activation_checkpointing: bool = False
    # the device's peak FLOP/s that MFU is measured against; 0: the data sheet's on a known GPU,
    # none elsewhere (a CPU's: measure it with bench.py)
    peak_flops: float = 0.0


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


def train_step(model, optimizer, scaler, ctx, batches, accum, grad_clip, ddp=False):
    """One optimizer step over the next `accum` micro-batches of the iterator `batches`. Returns the
    step's mean loss, as a tensor (reading it would wait for the device).
    bench.py times this function."""
    loss_sum = None
    for micro in range(accum):
        # On a GPU every op below only queues work, so reading the next batch from disk here
        # overlaps with the device still computing the previous micro-step.
        X, Y = next(batches)
        if ddp:
            # DDP all-reduces gradients in backward; only the last micro-step needs it, the
            # earlier ones just add into .grad locally
            model.require_backward_grad_sync = micro == accum - 1
        with ctx:
            _, loss = model(X, Y)
            # the gradient of the step is that of the mean loss over all micro-steps
            loss = loss / accum
        scaler.scale(loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # frees the gradients' memory until the next backward
    return loss_sum


def format_duration(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


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


def step_verdict(bad_iter, signum, world_size, lr, out_dir):
    """The stop signal any process received (0: none), the same on every process; a UserError if
    the loss of some step (bad_iter: the first, -1 for none) was not finite on some process. A
    device-to-host sync, and under DDP an all-reduce of two numbers, so that all processes stop at
    the same step: the loop asks only at log steps, before evaluations and when a signal came
    (nanoGPT syncs only on log steps too), so that a GPU never waits for the host in between."""
    flags = torch.stack([bad_iter.float(), torch.tensor(float(signum), device=bad_iter.device)])
    if world_size > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    bad_iter, signum = (int(f) for f in flags.tolist())
    if bad_iter >= 0:
        # Stop, not skip: a non-finite loss means the learning rate, the data or the precision is
        # wrong, and the weights and AdamW's moments have taken the nan/inf in.
        last_good = os.path.join(out_dir, 'ckpt.pt')
        raise UserError(f"the loss is not finite at iter {bad_iter} (lr {lr:.2e}): the run "
                        f"diverged and stopped without saving, so {last_good} (if any) is the "
                        "last good state: lower --learning_rate, then resume or restart")
    return signum


def check_config(cfg):
    for key in ('eval_interval', 'log_interval', 'eval_iters', 'gradient_accumulation_steps',
                'batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd'):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.max_iters <= 0 and not cfg.eval_only:
        raise UserError(f"max_iters must be positive, got {cfg.max_iters} "
                        "(to evaluate only, use --eval_only=True)")
    for key in ('warmup_iters', 'lr_decay_iters', 'grad_clip', 'peak_flops', 'weight_decay',
                'min_lr'):
        if not getattr(cfg, key) >= 0:  # also NaN
            raise UserError(f"{key} must be zero or more, got {getattr(cfg, key)}")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    for key in ('learning_rate', 'muon_lr'):
        if not getattr(cfg, key) > 0:
            raise UserError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in ('beta1', 'beta2', 'muon_momentum'):
        if not 0 <= getattr(cfg, key) < 1:
            raise UserError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"dropout must be in [0, 1), got {cfg.dropout}")
    # a GPT-2 to finetune (a checkpoint of ours brings its own switches)
    gpt2 = cfg.init_from not in ('scratch', 'resume') and not checkpoint_file(cfg.init_from)
    changed = [k for k in MODERN_SWITCHES if getattr(cfg, k) != getattr(TrainConfig, k)]
    if gpt2 and changed:
        raise UserError(f"init_from={cfg.init_from!r} loads GPT-2's architecture: "
                        f"leave {', '.join(changed)} at the default")
    if cfg.optimizer not in ('adamw', 'muon'):
        raise UserError(f"optimizer must be 'adamw' or 'muon', got {cfg.optimizer!r}")
    if cfg.parallelism not in ('ddp', 'fsdp'):
        raise UserError(f"parallelism must be 'ddp' or 'fsdp', got {cfg.parallelism!r}")
    if cfg.parallelism == 'fsdp' and (cfg.optimizer == 'muon' or cfg.dtype == 'float16'):
        raise UserError("parallelism='fsdp' works with optimizer='adamw' (Muon orthogonalises "
                        "whole matrices) and dtype bfloat16 or float32 (no fp16 grad scaler for "
                        "shards): change one of them")
    if (cfg.init_from not in ('scratch', 'resume', *GPT2_NAMES)
            and not os.path.exists(cfg.init_from)):
        raise UserError(f"init_from must be 'scratch', 'resume', one of {', '.join(GPT2_NAMES)}, "
                        "a local Hugging Face GPT-2 folder, or a checkpoint (a .pt file or a "
                        f"run's out_dir) to finetune, got {cfg.init_from!r}")
    if cfg.lora_rank < 0 or (cfg.lora_rank and not cfg.lora_alpha > 0):
        raise UserError(f"lora_rank must be 0 (off) or positive and lora_alpha positive, got "
                        f"{cfg.lora_rank} and {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    try:
        parse_targets(cfg.lora_targets)
    except ValueError as e:
        raise UserError(str(e)) from None


def main(cfg):
    check_config(cfg)
    if cfg.lora_rank and cfg.init_from == 'scratch':  # (bench.py adapts random models)
        raise UserError("lora_rank > 0 adapts a trained model: set init_from to a GPT-2 or a "
                        "checkpoint to finetune (or lora_rank=0 to train from scratch)")
    # Under torchrun every process runs this; RANK is set by torchrun, LOCAL_RANK picks the GPU.
    ddp = 'RANK' in os.environ
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in
                                    (('RANK', 0), ('LOCAL_RANK', 0), ('WORLD_SIZE', 1)))
    device = resolve_device(cfg.device)
    if ddp and device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dev = setup(device, cfg.dtype, cfg.compile)
    if ddp and cfg.parallelism == 'fsdp' and dev.dtype == 'float16':  # 'auto' on an older GPU
        raise UserError("parallelism='fsdp' has no fp16 grad scaler here: use --dtype=float32 "
                        "(or DDP, or a GPU with bf16)")
    if ddp:
        backend = (cfg.backend if cfg.backend != 'auto'
                   else ('nccl' if dev.type == 'cuda' else 'gloo'))
        # a timeout past the default 10 minutes: the other processes wait at their next collective
        # while rank 0 writes a checkpoint, which for gpt2-xl with AdamW state is ~19 GB
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(hours=1))
    try:
        if cfg.gradient_accumulation_steps % world_size:
            raise UserError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) "
                            f"must be divisible by the number of processes ({world_size})")
        # SIGINT, SIGTERM: stop after the current step (see the docstring); on_exit: what to
        # release however train() ends (out_dir's lock)
        with stop_signals() as received, ExitStack() as on_exit:
            return train(cfg, dev, rank, world_size, received, on_exit)
    finally:
        if ddp:
            torch.distributed.destroy_process_group()


def agreed(fn, world_size):
    """fn()'s result, run on every process; a UserError on any of them is raised on all (each
    prints the one line), rather than leaving the others waiting at their next collective until
    the connection breaks with a traceback."""
    try:
        result, error = fn(), None
    except UserError as e:
        result, error = None, str(e)
    if world_size > 1:
        errors = [None] * world_size
        torch.distributed.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UserError(error)
    return result


def start(cfg, dev, rank, world_size, on_exit):
    """The dataset, the multiple-choice items to score at evaluations (None), the model a run starts
    from and the checkpoint it resumes (None), out_dir's lock (process 0's, released by on_exit)."""
    master = rank == 0
    torch.manual_seed(cfg.seed)  # the same init on every process (FSDP shards it as it is)
    vocab, splits = open_dataset(cfg.dataset, cfg.data_dir, cfg.block_size)
    data_sha256 = val_sha256(cfg.dataset, cfg.data_dir)  # a resume must measure on the same val
    mc_items = load_items(cfg.mc_eval_file) if cfg.mc_eval_file else None
    model, ckpt = init_model(cfg, vocab, Tokenizer(vocab).vocab_size, master, data_sha256,
                             dev.device)
    if master and not cfg.eval_only:  # out_dir is this run's until it ends: no other writes there
        on_exit.callback(os.close, claim_out_dir(cfg))
    return vocab, splits, data_sha256, mc_items, model, ckpt


def make_ready(model, ckpt, cfg, dev, rank, world_size):
    """(raw_model, model, optimizer, scaler): the model placed on its device(s) (FSDP shards it),
    its optimizer and grad scaler, a resumed run's state restored, then wrapped (compile, DDP).
    raw_model is what is saved: never the compiled or DDP-wrapped module (FSDP's is it)."""
    if rank:
        torch.manual_seed(cfg.seed + rank)  # each process its own dropout masks
    model.checkpoint_blocks = cfg.activation_checkpointing
    place(model, dev, world_size, cfg.parallelism)  # before the optimizer: FSDP's shards are new
    # A GradScaler only for fp16, whose narrow range would flush small gradients to zero.
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.dtype == 'float16')
    optimizer = configure_optimizers(model, cfg, dev.type)
    if ckpt:
        restore_training(ckpt, model, optimizer, scaler)
        if rank:  # other ranks' dropout streams, freshly drawn after the restored rng
            torch.manual_seed(cfg.seed + rank + ckpt['iter_num'])
    return model, wrap(model, dev, world_size, cfg.parallelism, rank == 0), optimizer, scaler


class Pace:
    """Time per step over each log window, its moving average (the ETA) and MFU; the run's first
    window (compilation, allocator, caches) is left out of the averages, evaluations out of the
    time."""

    def __init__(self, iter_num, flops_per_iter, peak):
        self.start, self.flops_per_iter, self.peak = iter_num, flops_per_iter, peak
        self.dt_avg = self.mfu = None
        self.restart(iter_num)

    def restart(self, iter_num):
        self.t, self.window_start = time.perf_counter(), iter_num

    def lap(self, iter_num):
        """Seconds per step since the last lap; call after the device has finished (.item())."""
        dt = (time.perf_counter() - self.t) / (iter_num - self.window_start)
        if self.window_start > self.start:
            self.mfu = self.flops_per_iter / dt / self.peak if self.peak else None
            self.dt_avg = dt if self.dt_avg is None else 0.9 * self.dt_avg + 0.1 * dt
        self.restart(iter_num)
        return dt

    def eta(self, iters_left):
        return format_duration(iters_left * self.dt_avg) if self.dt_avg else '-'


def train(cfg, dev, rank, world_size, received, on_exit):
    t_launch = time.perf_counter()
    master = rank == 0  # the process that prints, logs and saves
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master:
        print_config(cfg)
        print(f"device {dev.device}, dtype {dev.dtype}, compile {dev.compile}, "
              f"{world_size} process(es); {tokens_per_iter:,} tokens per step")
    vocab, splits, data_sha256, mc_items, model, ckpt = agreed(
        lambda: start(cfg, dev, rank, world_size, on_exit), world_size)
    iter_num, best_val_loss = ((ckpt['iter_num'], ckpt['best_val_loss']) if ckpt
                               else (0, float('inf')))
    raw_model, model, optimizer, scaler = make_ready(model, ckpt, cfg, dev, rank, world_size)
    ckpt = None  # free the memory
    reset_peak_memory(dev.device)  # the memory the training steps need, not loading the model
    metrics = MetricsLog(cfg, iter_num, tokens_per_iter) if master and not cfg.eval_only else None

    def checkpoint(is_best):
        # every process takes part (FSDP gathers the state to process 0), process 0 writes
        ckpt = build_checkpoint(raw_model, optimizer, scaler, cfg, iter_num, best_val_loss, vocab,
                                data_sha256)
        if master:
            save_checkpoint(ckpt, cfg.out_dir, is_best, cfg.keep_prev_checkpoint)

    batches = train_batches(splits['train'], cfg, iter_num, rank, world_size, dev.device)
    local_accum = cfg.gradient_accumulation_steps // world_size
    # MFU counts one process's tokens against one GPU's data-sheet peak (none off CUDA: a CPU's peak
    # measured in passing would be a guess; bench.py measures it on an idle machine)
    peak = cfg.peak_flops or (peak_flops(dev.device, dev.dtype) if dev.type == 'cuda' else None)
    pace = Pace(iter_num, raw_model.flops_per_token() * tokens_per_iter / world_size, peak)
    start_iter = iter_num
    losses = {}  # of the last evaluation
    stop_signal = 0  # a SIGINT/SIGTERM that some process received by the end of the last step
    # the first step whose loss was not finite, kept on the device so that no step waits to read it
    bad_iter = torch.tensor(-1, device=dev.device)
    while True:
        # Evaluate (and save) every eval_interval steps and always after the last step. A resumed
        # run skips its first evaluation: the checkpoint it came from was just evaluated.
        last = iter_num >= cfg.max_iters
        saved = False
        if last or cfg.eval_only or (
                iter_num % cfg.eval_interval == 0
                and (iter_num > start_iter or iter_num == 0 and cfg.eval_at_start)):
            # alone, a stop signal ends an evaluation at once (under DDP the processes agree on it
            # at a log step)
            losses = estimate_loss(model, splits, cfg.eval_iters, cfg.batch_size, cfg.block_size,
                                   cfg.seed, dev.device, dev.autocast,
                                   stop=(lambda: received['signal']) if world_size == 1 else None)
            # FSDP's model runs only in step on all processes: each scores all the items then
            mc = (accuracy(raw_model, Tokenizer(vocab), mc_items, dev.device, dev.autocast,
                           *((rank, world_size) if cfg.parallelism == 'ddp' else (0, 1)))
                  if mc_items and losses else {})
            if losses is None:  # left unfinished: no best.pt from it, ckpt.pt below
                stop_signal, last = received['signal'], False
            elif master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, "
                      f"val loss {losses['val']:.4f}, "
                      + ''.join(f"{k} {v:.4f}, " for k, v in mc.items())
                      + f"{time.perf_counter() - t_launch:.1f} s since start", flush=True)
                if metrics:
                    metrics.log(iter_num, eval_train_loss=losses['train'], val_loss=losses['val'],
                                **mc)
            is_best = losses is not None and losses['val'] < best_val_loss
            if (losses and not cfg.eval_only and iter_num > start_iter
                    and (is_best or cfg.always_save_checkpoint)):
                if is_best:
                    best_val_loss = losses['val']  # only ever goes down: it is the loss of best.pt
                checkpoint(is_best)
                if master:
                    print(f"saved checkpoint to {cfg.out_dir}" + (" (new best)" if is_best else ""))
                saved = True
            pace.restart(iter_num)  # evaluation time doesn't count as training time
        if last or cfg.eval_only:
            break
        # a graceful stop: ckpt.pt gets this step (best.pt moves only at evaluations)
        if stop_signal:
            if not saved:
                checkpoint(is_best=False)
            if master:
                print(f"stopped by {signal.Signals(stop_signal).name} at iter {iter_num}, saved to "
                      f"{os.path.join(cfg.out_dir, 'ckpt.pt')}; "
                      "to continue, run the same command with --init_from=resume", flush=True)
            break

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)  # Muon's groups have their own peak
        loss_sum = train_step(model, optimizer, scaler, dev.autocast, batches, local_accum,
                              cfg.grad_clip, ddp=world_size > 1 and cfg.parallelism == 'ddp')
        iter_num += 1
        bad_iter = torch.where((bad_iter < 0) & ~loss_sum.isfinite(), iter_num, bad_iter)
        # Before this step's weights can reach a checkpoint or a log line: was every loss so far
        # finite, was a stop asked for? (Alone, a signal is seen at once; under DDP at a log step.)
        log_step = iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters
        eval_next = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters
        if log_step or eval_next or (world_size == 1 and received['signal']):
            stop_signal = step_verdict(bad_iter, received['signal'], world_size, lr, cfg.out_dir)

        if log_step:
            if world_size > 1:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            lossf = loss_sum.item()  # .item() waits for the device, so the clock below is honest
            dt, mfu = pace.lap(iter_num), pace.mfu
            mem = peak_memory(dev.device)  # bytes, this process's
            if master:
                # flush: shows in `| tee` too
                print(f"iter {iter_num}/{cfg.max_iters} "
                      f"({100 * iter_num / max(cfg.max_iters, 1):.0f}%): loss {lossf:.4f}, "
                      f"lr {lr:.2e}, {dt * 1000:.1f} ms, {tokens_per_iter / dt:,.0f} tok/s, "
                      + (f"mfu {100 * mfu:.1f}%, " if mfu is not None else '')
                      + (f"peak mem {mem / 2**30:.2f} GiB, " if mem else '')
                      + f"eta {pace.eta(cfg.max_iters - iter_num)}", flush=True)
                metrics.log(iter_num, train_loss=lossf, lr=lr, ms_per_iter=round(dt * 1000, 3),
                            **({'mfu': round(mfu, 5)} if mfu is not None else {}),
                            **({'peak_mem_gib': round(mem / 2**30, 3)} if mem else {}))
    if metrics:
        metrics.close()
    return {'iter_num': iter_num, 'best_val_loss': best_val_loss, 'losses': losses,
            'stop_signal': 0 if last else stop_signal}


if __name__ == '__main__':
    result = cli(main, TrainConfig)
    # why 128+: see the docstring
    sys.exit(128 + result['stop_signal'] if result['stop_signal'] else 0)
