r"""
Sampling benchmarks. --mode=speed (the default): tokens/s of generate with and without the KV
cache, for a checkpoint or for a model shape with random weights.

    python scripts/bench_sample.py  # 1000 tokens of train_shakespeare_char.py's 6x384, context 256
    python scripts/bench_sample.py --out_dir=out-shakespeare-char-cpu --prompt_len=32 \
        --max_new_tokens=500
    python scripts/bench_sample.py --use_cache=on --dtypes=bfloat16,float32 --batch_size=8
    python scripts/bench_sample.py --use_cache=on --batch_size=16 --max_new_tokens=500

Each cached path is also timed with the decode step compiled (--compiled=False skips it), and
printed beside the limit of this machine (weight bytes a step / measured memory bandwidth, FLOPs a
step / measured matmul peak, the slower of the two).

--mode=bf16 (--mode=int8): how much sampling in bf16 (weight-only int8) changes a checkpoint: its
val loss that way against fp32, and how many greedy continuations of prompts taken from the val
text agree token for token.

    python scripts/bench_sample.py --mode=bf16 --out_dir=out-shakespeare-char-cpu \
        --data_dir=data/shakespeare_char
    python scripts/bench_sample.py --mode=int8 --out_dir=out-shakespeare-char-cpu \
        --data_dir=data/shakespeare_char --greedy_tokens=200
"""

import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import cli
from model import GPT, GPTConfig
from nanogpt.checkpoint import load_model
from nanogpt.dataset import estimate_loss, open_dataset
from nanogpt.device import (
    autocast_context,
    memory_bandwidth,
    peak_flops,
    resolve_sample_dtype,
    setup,
)
from nanogpt.errors import UserError
from nanogpt.generation import compile_decode, generate
from nanogpt.quantize import quantize_int8


@dataclass
class BenchSampleConfig:
    # 'speed': tokens/s; 'bf16', 'int8': val loss and greedy text in bf16 / int8 against fp32
    mode: str = 'speed'
    # a training run's folder to take the model from; '' builds the shape below (speed only)
    out_dir: str = ''
    ckpt: str = 'best.pt'
    # the shape without out_dir: config/train_shakespeare_char.py's baby GPT on its 65 characters
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    vocab_size: int = 65
    # speed
    prompt_len: int = 1  # tokens of random prompt
    max_new_tokens: int = 1000
    batch_size: int = 1  # sequences sampled together
    use_cache: str = 'both'  # 'on', 'off' or 'both'
    # of the cached path, comma-separated; 'auto': sample.py's default; 'int8': weight-only int8
    # (quantize.quantize_int8), activations in fp32
    dtypes: str = 'auto,float32'
    repeats: int = 3  # timed runs of each path, after a warm-up; the fastest is reported
    # also time the cached paths with the decode step compiled (generation.compile_decode); the
    # compile time (the warm-up) is printed
    compiled: bool = True
    # bf16
    data_dir: str = ''  # the checkpoint's dataset folder (val.bin, meta.json); '' is data/<dataset>
    dataset: str = 'shakespeare_char'
    # val batches of 64 windows for the loss (30 x 64 x 64: about tiny Shakespeare's val split)
    eval_iters: int = 30
    n_prompts: int = 20  # greedy continuations of prompts from evenly spaced places in the val text
    greedy_prompt_len: int = 32
    greedy_tokens: int = 50  # tokens per continuation that must agree
    seed: int = 1337
    device: str = 'auto'
    threads: int = 0  # CPU threads for PyTorch; 0 keeps its default (one per core)


def path_name(use_cache, dtype, compiled=False):
    return f"{'KV cache' if use_cache else 'no cache'}, {dtype}{', compiled' if compiled else ''}"


def time_generate(model, idx, cfg, device, use_cache, dtype, step, n):
    """Seconds of one run of generate for n new tokens, sampling at temperature 1, each row from its
    own random stream (as sample.py does); step: a compiled step of model's, or None."""
    seeds = torch.arange(cfg.seed, cfg.seed + len(idx), device=device)
    dtype = 'float32' if dtype == 'int8' else dtype  # int8 weights, fp32 activations
    with torch.no_grad(), autocast_context(device, dtype):
        t0 = time.perf_counter()
        out = generate(model, idx, n, use_cache=use_cache, seeds=seeds, step=step)
        out[0, -1].item()  # waits for the device, so the clock is honest
        return time.perf_counter() - t0


def speed(cfg, model, device):
    dtypes = list(dict.fromkeys(d.strip() if d.strip() == 'int8' else
                                resolve_sample_dtype(d.strip(), device, cfg.batch_size)
                                for d in cfg.dtypes.split(',')))
    # the model each dtype decodes with; the classic loop's is fp32
    models = {d: quantize_int8(model) if d == 'int8' else model for d in [*dtypes, 'float32']}
    caches = {'on': [True], 'off': [False], 'both': [True, False]}.get(cfg.use_cache)
    if caches is None:
        raise UserError(f"use_cache must be 'on', 'off' or 'both', got {cfg.use_cache!r}")
    if cfg.prompt_len < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.repeats < 1:
        raise UserError("prompt_len, max_new_tokens, batch_size and repeats must be positive")
    c = model.config
    print(f"{c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, context {c.block_size}, "
          f"vocab {c.vocab_size}; batch {cfg.batch_size}, prompt {cfg.prompt_len}, "
          f"{cfg.max_new_tokens} new tokens; {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randint(c.vocab_size, (cfg.batch_size, cfg.prompt_len), generator=g).to(device)
    # no cache: the classic loop, the baseline, in fp32
    paths = [(use_cache, dtype, compiled) for use_cache in caches
             for dtype in (dtypes if use_cache else ['float32'])
             for compiled in ([False, True] if use_cache and cfg.compiled else [False])]
    # each compiled path's step, compiled by its warm-up
    steps = {path: compile_decode(models[path[1]], device.split(':')[0]) if path[2] else None
             for path in paths}
    for path in paths:
        # warm-up: allocate, pick kernels, compile (a compiled step to a refill of the cache,
        # which has a graph of its own)
        warm = max(10, c.block_size - cfg.prompt_len + 2) if path[2] else 10
        dt = time_generate(models[path[1]], idx, cfg, device, *path[:2], steps[path],
                           min(cfg.max_new_tokens, warm))
        if path[2]:
            print(f"{path_name(*path)}: compiled in {dt:.1f} s (the warm-up)", flush=True)
    # the paths take turns, repeats times, and each keeps its fastest run:
    # a machine whose speed drifts (a shared host) then slows them alike,
    # rather than whichever happened to run in a slow minute
    best = {path: float('inf') for path in paths}
    for _ in range(cfg.repeats):
        for path in paths:
            best[path] = min(best[path],
                             time_generate(models[path[1]], idx, cfg, device, *path[:2],
                                           steps[path], cfg.max_new_tokens))
    results = {}
    limit = limits(model, cfg.batch_size, device, dtypes)
    for path, dt in best.items():
        results[path] = cfg.batch_size * cfg.max_new_tokens / dt
        gap = (f", {results[path] / limit[path[1]]:.0%} of the limit" if path[0] else '')
        print(f"{path_name(*path)}: {results[path]:.1f} tokens/s ({dt:.2f} s){gap}")
    base = results.get((False, 'float32', False))  # the classic loop
    for path, tps in results.items():
        if base and path != (False, 'float32', False):
            print(f"{path_name(*path)}: {tps / base:.1f}x the tokens/s of no cache, float32")
    return results


def limits(model, rows, device, dtypes):
    """The fastest a cached decode step of `rows` rows could go on this machine, in tokens/s, per
    dtype: bound by reading the weights (every matrix once per step, for all rows: bytes / the
    measured memory bandwidth) or by arithmetic (2 FLOPs per weight and row, plus attention over a
    full cache: FLOPs / the measured matmul peak), whichever is slower. Printed with its parts."""
    c = model.config
    # matrices a step multiplies by: every Linear (the head, tied or not); not the lookups
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    flops = rows * (2 * n + 4 * c.n_layer * c.n_embd * c.block_size)  # per step
    bandwidth = memory_bandwidth(device)
    out = {}
    for dtype in dtypes:
        nbytes = n * (1 if dtype == 'int8' else getattr(torch, dtype).itemsize)
        peak = peak_flops(device, 'float32' if dtype == 'int8' else dtype)
        t_mem, t_flop = nbytes / bandwidth, flops / peak
        out[dtype] = rows / max(t_mem, t_flop)
        print(f"limit, {dtype}: {out[dtype]:,.0f} tokens/s for {rows} rows: "
              f"{nbytes / 1e6:.3g} MB of weights a step / {bandwidth / 1e9:.1f} GB/s measured = "
              f"{t_mem * 1e3:.3f} ms; {flops / 1e6:.1f} MFLOP a step / "
              f"{peak / 1e9:.0f} GFLOP/s measured = {t_flop * 1e3:.3f} ms")
    return out


def precision_check(cfg, model, vocab, device):
    """mode bf16 or int8: the checkpoint's val loss and greedy continuations in that precision
    (bf16 autocast; int8 weights with fp32 activations) against fp32."""
    if min(cfg.eval_iters, cfg.n_prompts, cfg.greedy_prompt_len, cfg.greedy_tokens) < 1:
        raise UserError("eval_iters, n_prompts, greedy_prompt_len and greedy_tokens "
                        "must be positive")
    data_vocab, splits = open_dataset(cfg.dataset, cfg.data_dir, model.config.block_size)
    if data_vocab != vocab:
        raise UserError("the checkpoint was trained on another vocabulary than "
                        f"{cfg.data_dir or cfg.dataset}")
    val = splits['val']
    name = 'bfloat16' if cfg.mode == 'bf16' else 'int8'
    # each variant: (model, autocast dtype)
    variants = {'float32': (model, 'float32'),
                name: (model, 'bfloat16') if name == 'bfloat16' else (quantize_int8(model),
                                                                       'float32')}
    # the val loss as train.py estimates it: the mean over eval_iters fixed random batches
    loss = {k: estimate_loss(m, {'val': val}, cfg.eval_iters, 64, model.config.block_size,
                             cfg.seed, device, autocast_context(device, dtype))['val']
            for k, (m, dtype) in variants.items()}
    print(f"val loss over {cfg.eval_iters} x 64 windows of {model.config.block_size}: "
          f"float32 {loss['float32']:.5f}, {name} {loss[name]:.5f}, "
          f"difference {loss[name] - loss['float32']:+.5f}")

    L = cfg.greedy_prompt_len
    stride = (len(val) - L) // cfg.n_prompts
    prompts = torch.stack([torch.from_numpy(val[i * stride:i * stride + L].astype('int64'))
                           for i in range(cfg.n_prompts)]).to(device)  # (n_prompts, L)
    out = {}
    for k, (m, dtype) in variants.items():
        m.eval()
        with torch.no_grad(), autocast_context(device, dtype):
            out[k] = generate(m, prompts, cfg.greedy_tokens, temperature=0.0)[:, L:]
    # leading tokens that agree
    same = (out['float32'] == out[name]).int().cumprod(dim=1).sum(dim=1)
    print(f"greedy continuations of {cfg.n_prompts} val prompts of {L} tokens: "
          f"{(same == cfg.greedy_tokens).sum().item()} of {cfg.n_prompts} agree "
          f"for all {cfg.greedy_tokens} tokens; "
          f"agreeing prefix per prompt: {same.tolist()}")
    return loss, same


def main(cfg):
    if cfg.mode not in ('speed', 'bf16', 'int8'):
        raise UserError(f"mode must be 'speed', 'bf16' or 'int8', got {cfg.mode!r}")
    # threads: on a shared machine, fewer threads than cores wait less for each other
    device = setup(cfg.device, threads=cfg.threads).device
    torch.manual_seed(cfg.seed)
    if cfg.out_dir:
        model, tokenizer, _ = load_model('resume', cfg.out_dir, cfg.ckpt)
        vocab = tokenizer.spec
    elif cfg.mode != 'speed':
        raise UserError(f"mode={cfg.mode} needs a trained model: give --out_dir (and --data_dir)")
    else:
        model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              block_size=cfg.block_size, vocab_size=cfg.vocab_size, dropout=0.0))
    model.eval().to(device)
    return (speed(cfg, model, device) if cfg.mode == 'speed'
            else precision_check(cfg, model, vocab, device))


if __name__ == '__main__':
    cli(main, BenchSampleConfig)
