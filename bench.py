r"""
Benchmark training steps: how fast the trainer's step (forward, backward, clip, optimizer) runs on
this device, and how close that is to the hardware's peak (MFU).

    python bench.py config/train_shakespeare_char_cpu.py                   # the CPU recipe's shape
    python bench.py config/train_shakespeare_char_cpu.py --real_data=True  # on its real batches
    python bench.py config/train_gpt2.py \
        --batch_size=12 --gradient_accumulation_steps=1                    # GPT-2 124M, one GPU
    python bench.py config/train_shakespeare_char_cpu.py --profile=True    # + chrome trace, top ops
    python bench.py config/finetune_shakespeare_lora.py --init_from=scratch --n_layer=48 \
        --n_head=25 --n_embd=1600 --memory=True --bench_iters=0            # will gpt2-xl fit?

It takes any training config (every train.py knob), builds the model from scratch, runs
`bench_warmup` untimed steps (compilation, allocator, caches), then times `bench_iters` steps one by
one, waiting for the device at the end of each, and reports the median. The step is
train.train_step, the very function train.py runs, the model and optimizer are built as train.py
builds them, and batches come from the same iterator: on a random token array by default (no
dataset needed), or on the dataset's train split with real_data=True.

MFU (model FLOPs utilisation) divides the model's training FLOP/s (6N + attention,
model.flops_per_token) by the device's peak: a GPU's data-sheet bf16 peak, or on CPU and mps the
matmul FLOP/s measured here at start (both fp32 and bf16 are printed; MFU is against the one of the
run's dtype).

memory=True prints the peak memory per process that memory.py estimates for this config, alone and
under DDP and FSDP on 2 to 8 processes, and beside it the peak the timed steps really reached
(device.peak_memory). LoRA (lora_rank > 0) adapts the random model: the figures are about memory
and speed, not quality.
"""

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from configurator import cli, print_config
from nanogpt.dataset import open_dataset, train_batches
from nanogpt.device import peak_flops, peak_memory, reset_peak_memory, setup
from nanogpt.errors import UserError
from nanogpt.init_from import init_model
from nanogpt.memory import estimate_memory
from nanogpt.optimizers import configure_optimizers
from nanogpt.tokenizer import Tokenizer
from train import TrainConfig, check_config, train_step


@dataclass
class BenchConfig(TrainConfig):
    # every TrainConfig knob (model, batch, optimizer, device, dtype, compile), and:
    bench_warmup: int = 5  # untimed steps first (the lr stays at learning_rate: no schedule)
    bench_iters: int = 30  # timed steps
    real_data: bool = False  # batches from the dataset's train split; False: random tokens
    vocab_size: int = 50257  # with random tokens: GPT-2's (padded as train.py pads it: 50304)
    # also profile a few steps with torch.profiler: a table of the top ops and a trace
    profile: bool = False
    trace_file: str = 'bench_trace.json'  # the profile's chrome trace (open in ui.perfetto.dev)
    memory: bool = False  # print memory.py's estimate per process; with bench_iters=0, only that


def main(cfg):
    check_config(cfg)
    if cfg.init_from != 'scratch':
        raise UserError("bench.py times a model built from scratch: leave init_from at 'scratch'")
    print_config(cfg)
    dev = setup(cfg.device, cfg.dtype, cfg.compile)
    device, device_type, dtype = dev.device, dev.type, dev.dtype
    torch.manual_seed(cfg.seed)

    if cfg.real_data:
        vocab, splits = open_dataset(cfg.dataset, cfg.data_dir, cfg.block_size)
        data, vocab_size = splits['train'], Tokenizer(vocab).vocab_size
    else:
        vocab_size = cfg.vocab_size
        # 1M tokens
        data = np.random.default_rng(cfg.seed).integers(0, vocab_size, 2**20, dtype=np.uint16)
    raw_model, _ = init_model(cfg, None, vocab_size, verbose=False)
    raw_model.checkpoint_blocks = cfg.activation_checkpointing
    if cfg.memory:
        estimates = print_memory_estimates(cfg, raw_model, device_type, dtype)
        if cfg.bench_iters == 0:
            return {'memory_estimate': estimates[(1, 'ddp')]}
    model = raw_model.to(device)
    optimizer = configure_optimizers(model, cfg, device_type)
    for group in optimizer.param_groups:
        group['lr'] = cfg.learning_rate * group.get('lr_scale', 1.0)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    if dev.compile:
        model = torch.compile(model)

    accum, B, T = cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size
    tokens_per_iter = accum * B * T
    batches = train_batches(data, cfg, device=device)

    def run_step():
        loss = train_step(model, optimizer, scaler, dev.autocast, batches, accum, cfg.grad_clip)
        return loss.item()  # waits for the device: the step is really done when the clock is read

    peaks = {'float32': peak_flops(device, 'float32')} if device_type in ('cpu', 'mps') else {}
    if device_type in ('cpu', 'mps') and dtype != 'float32':
        peaks[dtype] = peak_flops(device, dtype)
    peak = peaks.get(dtype) or peak_flops(device, dtype)
    print(f"device {device}, dtype {dtype}, {torch.get_num_threads()} threads, "
          f"{tokens_per_iter:,} tokens per step, "
          f"{raw_model.get_num_params() / 1e6:.2f}M parameters, "
          f"{raw_model.flops_per_token() / 1e6:.1f} MFLOP per token")
    print("peak: " + (', '.join(f"{k} {v / 1e9:,.0f} GFLOP/s (measured)" for k, v in peaks.items())
                      or f"{peak / 1e12:,.0f} TFLOP/s (data sheet)"))

    reset_peak_memory(device)
    t0 = time.perf_counter()
    for _ in range(cfg.bench_warmup):
        run_step()
    print(f"warm-up: {cfg.bench_warmup} steps in {time.perf_counter() - t0:.2f} s")
    times, losses = [], []
    for _ in range(cfg.bench_iters):
        t0 = time.perf_counter()
        losses.append(run_step())
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    result = {'ms_per_iter': dt * 1000, 'tokens_per_s': tokens_per_iter / dt,
              'mfu': raw_model.flops_per_token() * tokens_per_iter / dt / peak, 'peak_flops': peak,
              'tokens_per_iter': tokens_per_iter, 'times': times, 'loss': losses[-1]}
    print(f"{cfg.bench_iters} steps: median {dt * 1000:.2f} ms/iter (min {min(times) * 1000:.2f}, "
          f"max {max(times) * 1000:.2f}), {result['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {100 * result['mfu']:.1f}%, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    result['peak_memory'] = peak_memory(device)
    if cfg.memory and result['peak_memory']:
        est = estimates[(1, 'ddp')].total
        print(f"peak memory: measured {result['peak_memory'] / 2**30:.2f} GiB, estimated "
              f"{est / 2**30:.2f} GiB ({100 * (est / result['peak_memory'] - 1):+.0f}%)")

    if cfg.profile:
        from torch.profiler import ProfilerActivity, profile
        activities = ([ProfilerActivity.CPU]
                      + ([ProfilerActivity.CUDA] if device_type == 'cuda' else []))
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(5):
                run_step()
        prof.export_chrome_trace(cfg.trace_file)
        sort_by = 'self_cuda_time_total' if device_type == 'cuda' else 'self_cpu_time_total'
        print(prof.key_averages().table(sort_by=sort_by, row_limit=20))
        print(f"chrome trace of 5 steps written to {os.path.abspath(cfg.trace_file)}")
        result['profile'] = prof
    return result


def print_memory_estimates(cfg, model, device_type, dtype):
    """memory.py's estimate per process, one process and 2 to 8 under DDP and FSDP: a table."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"memory per process (GiB): {model.get_num_params(False) / 1e6:,.1f}M parameters, "
          f"{trainable / 1e6:,.2f}M trainable, micro-batch {cfg.batch_size} x {cfg.block_size}"
          + (", activation checkpointing" if cfg.activation_checkpointing else ''))
    print(f"{'processes':>12} {'params':>8} {'grads':>8} {'optimizer':>9} {'activations':>11} "
          f"{'peak':>8}")
    estimates = {}
    for world_size, parallelism in ((1, 'ddp'), *((n, p) for p in ('ddp', 'fsdp')
                                                  for n in (2, 4, 8))):
        e = estimate_memory(cfg, model, world_size, parallelism, device_type, dtype)
        estimates[world_size, parallelism] = e
        name = '1' if world_size == 1 else f"{world_size} {parallelism.upper()}"
        print(f"{name:>12} " + ' '.join(f"{v / 2**30:{w}.2f}" for v, w in (
            (e.params, 8), (e.grads, 8), (e.optimizer, 9), (e.activations, 11), (e.total, 8))))
    return estimates


if __name__ == '__main__':
    cli(main, BenchConfig)
