"""
Sample text from a trained model. Needs nothing but the checkpoint (it carries its vocabulary), or
OpenAI's GPT-2 itself.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --device=cpu
"""

import os
import time
from dataclasses import dataclass

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from configurator import UserError, autocast_context, cli, resolve_compile, resolve_device, resolve_dtype
from model import GPT
from tokenizer import GPT2_VOCAB, Tokenizer


@dataclass
class SampleConfig:
    init_from: str = 'resume'  # 'resume' (out_dir/ckpt), or OpenAI's 'gpt2' ... 'gpt2-xl' or a local HF GPT-2 folder
    out_dir: str = 'out'  # the training run's folder
    ckpt: str = 'best.pt'  # which checkpoint in out_dir: best.pt (lowest val loss) or ckpt.pt (latest)
    start: str = '\n'  # the prompt, or FILE:path to read it from a file
    num_samples: int = 10
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0 samples the model's distribution, lower is more conservative, 0 is greedy
    top_k: int | None = 200  # sample only among the k most likely tokens; None for all
    seed: int = 1337
    device: str = 'auto'
    dtype: str = 'auto'
    compile: bool | str = False  # compiling rarely pays for itself for one sampling run


def main(cfg):
    for key in ('num_samples', 'max_new_tokens'):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.temperature < 0:
        raise UserError(f"temperature must be 0 or more, got {cfg.temperature}")
    if cfg.top_k is not None and cfg.top_k <= 0:
        raise UserError(f"top_k must be positive or None, got {cfg.top_k}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)

    if cfg.init_from == 'resume':
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, cfg.ckpt))
        model = model_from_checkpoint(ckpt, dropout=0.0)
        tokenizer = Tokenizer(ckpt['vocab'])
        del ckpt
    else:
        model = GPT.from_pretrained(cfg.init_from, dropout=0.0)
        tokenizer = Tokenizer(GPT2_VOCAB)
    model.eval().to(device)
    if resolve_compile(cfg.compile, device):
        model = torch.compile(model)

    start = cfg.start
    if start.startswith('FILE:'):
        path = start[5:]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} not found")
        with open(path, encoding='utf-8') as f:
            start = f.read()
    ids = tokenizer.encode(start)
    if not ids:
        raise UserError("the prompt is empty: give --start some text the model knows")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]  # (1, T)

    samples = []
    t0 = time.perf_counter()
    with torch.no_grad(), autocast_context(device, dtype):
        for _ in range(cfg.num_samples):
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k)
            samples.append(tokenizer.decode(y[0].tolist()))
            print(samples[-1])
            print('---------------')
    dt = time.perf_counter() - t0
    print(f"{cfg.num_samples * cfg.max_new_tokens / dt:,.1f} tokens/s on {device} ({dtype})")
    return samples


if __name__ == '__main__':
    cli(main, SampleConfig)
