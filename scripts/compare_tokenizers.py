"""
Tokenizers compared where they can be: the val bits per byte of the quick start's model
(config/train_shakespeare_char_cpu.py, 4x128, context 64, 12 windows a step) on tiny Shakespeare,
one character per token against byte-level BPEs of our own learned from the train split.

    python scripts/compare_tokenizers.py  # char, BPE 512, 2048, 8192: 2000 steps each
    python scripts/compare_tokenizers.py --tokenizers=char,2048,gpt2 --max_iters=500 --work=/tmp/tok

Every tokenizer gets the same steps of the same windows of 64 tokens, so a BPE sees more text per
step (bytes seen is in the table) and each position more context. The wall times are what this
machine gave, under whatever else ran on it. Prints a Markdown table and writes it as JSON to
work/results.json; the runs (data, out, eval JSON) stay in work/.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import cli
from nanogpt.checkpoint import load_checkpoint
from nanogpt.errors import UserError
from nanogpt.prepare import read_text, split_and_write
from nanogpt.tokenizer import GPT2_VOCAB, char_vocab, train_bpe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class CompareConfig:
    # the text (default: the quick start's copy; `python data/shakespeare_char/prepare.py` gets it)
    input: str = os.path.join(REPO, 'data', 'shakespeare_char', 'input.txt')
    work: str = 'out-compare-tokenizers'  # data and runs go in here, one folder per tokenizer
    # 'char', 'gpt2' (GPT-2's 50257 tokens), or a vocabulary size for a BPE learned here
    tokenizers: str = 'char,512,2048,8192'
    config: str = 'config/train_shakespeare_char_cpu.py'  # the model shape and its recipe
    max_iters: int = 2000  # the same for every tokenizer (the quick start's)


def check_config(cfg):
    if not os.path.isfile(cfg.input):
        raise UserError(f"input {cfg.input} not found: run "
                        "`python data/shakespeare_char/prepare.py` or pass --input=FILE")
    for name in cfg.tokenizers.split(','):
        if name not in ('char', 'gpt2') and not name.isdigit():
            raise UserError(f"tokenizer {name!r}: expected 'char', 'gpt2' or a vocabulary size")
    if cfg.max_iters < 1:
        raise UserError(f"max_iters must be at least 1, got {cfg.max_iters}")


def run(*args):
    """A script of ours as a user runs it; its output goes to the console as it comes."""
    r = subprocess.run([sys.executable, *args], cwd=REPO)
    if r.returncode:
        raise UserError(f"`python {' '.join(args)}` failed (exit {r.returncode}): see above")


def compare(cfg, text, name):
    dataset = name if name in ('char', 'gpt2') else f'bpe{name}'
    data, out = (os.path.join(cfg.work, dataset, d) for d in ('data', 'out'))
    t0 = time.perf_counter()
    vocab = (char_vocab(text) if name == 'char' else GPT2_VOCAB if name == 'gpt2'
             else train_bpe([text[:int(len(text) * 0.9)]], int(name)))  # the train split's text
    learn_s = time.perf_counter() - t0 if name.isdigit() else 0.0
    split_and_write(text, vocab, data)
    with open(os.path.join(data, 'meta.json')) as f:
        meta = json.load(f)
    t0 = time.perf_counter()
    run('train.py', cfg.config, f'--dataset={dataset}', f'--data_dir={data}', f'--out_dir={out}',
        f'--max_iters={cfg.max_iters}', f'--lr_decay_iters={cfg.max_iters}')
    train_s = time.perf_counter() - t0
    load = os.getloadavg()[1]  # what else ran: the mean number of runnable processes, last 5 min
    # the last checkpoint (the run ends with a save), on the whole val split
    run('eval.py', f'--out_dir={out}', f'--data_dir={data}', '--ckpt=ckpt.pt', '--bleu_samples=0',
        '--device=cpu')
    with open(os.path.join(out, 'eval_ckpt_val.json')) as f:
        result = json.load(f)
    train_bytes = len(text[:int(len(text) * 0.9)].encode('utf-8'))
    bytes_per_token = train_bytes / meta['train_tokens']
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    c = ckpt['config']
    tokens_per_step = c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']
    params = sum(t.numel() for k, t in ckpt['model'].items() if k != 'lm_head.weight')  # tied
    return {'tokenizer': dataset, 'vocab_size': meta['vocab_size'], 'params': params,
            'learn_s': learn_s,
            'bytes_per_token': bytes_per_token, 'tokens_per_step': tokens_per_step,
            'bytes_seen': tokens_per_step * cfg.max_iters * bytes_per_token, 'train_s': train_s,
            'load_5min': load, 'val_loss': result['loss'],
            'val_bits_per_byte': result['bits_per_byte']}


def main(cfg):
    check_config(cfg)
    text = read_text(cfg.input)
    results = []
    for name in cfg.tokenizers.split(','):
        results.append(compare(cfg, text, name))
        with open(os.path.join(cfg.work, 'results.json'), 'w') as f:
            json.dump({'config': vars(cfg), 'results': results}, f, indent=1)
    print(f"\n{cfg.max_iters} steps of {cfg.config}\n")
    print("| tokenizer | vocab | parameters | bytes/token | MB seen | BPE learned in | training | "
          "val loss/token | val bits/byte |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['tokenizer']} | {r['vocab_size']:,} | {r['params'] / 1e6:.2f}M | "
              f"{r['bytes_per_token']:.2f} | {r['bytes_seen'] / 1e6:.1f} | {r['learn_s']:.1f} s | "
              f"{r['train_s'] / 60:.1f} min | {r['val_loss']:.3f} | "
              f"{r['val_bits_per_byte']:.3f} |")
    return results


if __name__ == '__main__':
    cli(main, CompareConfig)
