"""
LoRA against full finetuning, on a CPU in minutes: a character-level GPT pretrained here on the
first half of tiny Shakespeare, then finetuned on the second half both ways; the table compares
their best val loss on the second half's held-out 10%, with the base model before finetuning.

    python scripts/lora_shakespeare.py  # tiny Shakespeare from data/shakespeare_char
    python scripts/lora_shakespeare.py --input=input.txt --work=/tmp/lora_shakespeare

Both halves keep the whole text's character vocabulary, so the pretrained model reads either. Each
run is train.main with the CPU recipe's model (config/train_shakespeare_char_cpu.py); the table
goes into docs/finetuning.md.
"""

import os
import sys
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import cli, load_config  # noqa: E402
from nanogpt.checkpoint import load_checkpoint  # noqa: E402
from nanogpt.prepare import read_text, split_and_write  # noqa: E402
from nanogpt.tokenizer import char_vocab  # noqa: E402
from train import TrainConfig, main  # noqa: E402

RECIPE = os.path.join(REPO, 'config', 'train_shakespeare_char_cpu.py')
# each finetune: 500 steps of 12 x 64 characters, evaluated every 100 on the second half's val
FINETUNE = dict(max_iters=500, lr_decay_iters=500, warmup_iters=0, eval_interval=100,
                eval_iters=40, min_lr=1e-5)
RUNS = {  # name: the flags of the finetune; two learning rates each, to compare each at its best
    'full, lr 3e-4': dict(learning_rate=3e-4),
    'full, lr 1e-3': dict(learning_rate=1e-3),
    'LoRA r=4 attention, lr 3e-3': dict(learning_rate=3e-3, lora_rank=4, lora_alpha=8.0),
    'LoRA r=4 attention, lr 1e-2': dict(learning_rate=1e-2, lora_rank=4, lora_alpha=8.0),
    'LoRA r=8 attention, lr 3e-3': dict(learning_rate=3e-3, lora_rank=8, lora_alpha=16.0),
}


def run(work, name, **flags):
    out_dir = os.path.join(work, name.replace(' ', '_').replace(',', '').replace('=', ''))
    cfg = load_config(TrainConfig, [RECIPE, *(f'--{k}={v!r}' for k, v in
                                              {'out_dir': out_dir, 'overwrite': True,
                                               **flags}.items())])
    t0 = time.perf_counter()
    result = main(cfg)
    return out_dir, result, time.perf_counter() - t0


@dataclass
class LoraShakespeareConfig:
    input: str = ''  # tiny Shakespeare ('': data/shakespeare_char's, downloaded by its prepare.py)
    work: str = '/tmp/lora_shakespeare'  # datasets and runs go here


def experiment(cfg):
    text = read_text(cfg.input or None, None, os.path.join(REPO, 'data', 'shakespeare_char',
                                                     'input.txt'))
    vocab = char_vocab(text)  # the whole text's: both halves are read with it
    half = len(text) // 2
    for part, piece in (('first', text[:half]), ('second', text[half:])):
        split_and_write(piece, vocab, os.path.join(cfg.work, f'{part}_half'))
    data = dict(dataset='shakespeare_char')
    base_dir, base, t = run(cfg.work, 'base', data_dir=os.path.join(cfg.work, 'first_half'),
                            **data)
    print(f"pretrained on the first half in {t:.0f} s: val loss {base['best_val_loss']:.4f}")
    second = dict(data, data_dir=os.path.join(cfg.work, 'second_half'), init_from=base_dir,
                  **FINETUNE)
    # the base model on the second half, unchanged: evaluated only
    _, before, _ = run(cfg.work, 'before', **{**second, 'eval_only': True})
    rows = [('pretrained, not finetuned', before['losses']['val'], 0, '-')]
    for name, flags in RUNS.items():
        out_dir, result, t = run(cfg.work, name, **second, **flags)
        ckpt = load_checkpoint(os.path.join(out_dir, 'best.pt'))
        trainable = (sum(v.numel() for k, v in ckpt['model'].items() if '.lora_' in k)
                     if ckpt['lora'] else
                     sum(v.numel() for k, v in ckpt['model'].items() if k != 'lm_head.weight'))
        rows.append((name, result['best_val_loss'], trainable, f"{t:.0f}"))
    total = rows[1][2]
    print("\n| finetune on the second half | best val loss | trainable parameters | time (s) |")
    print("| --- | --- | --- | --- |")
    for name, loss, trainable, t in rows:
        share = f" ({100 * trainable / total:.2f}%)" if trainable else ''
        print(f"| {name} | {loss:.4f} | {trainable:,}{share} | {t} |")


if __name__ == '__main__':
    cli(experiment, LoraShakespeareConfig)
