"""
Evaluate a model on a whole split of a dataset: the exact next-token loss, perplexity, bits per
token, character and byte, and BLEU of generated continuations against the real ones.

    python eval.py --out_dir=out-shakespeare-char-cpu  # best.pt, on the val split of its dataset
    python eval.py --out_dir=out-shakespeare-char --ckpt=ckpt.pt --split=train --max_tokens=100000
    python eval.py --init_from=gpt2 --dataset=openwebtext --out_dir=out-eval-gpt2 --bleu_samples=0
    python eval.py --out_dir=out-shakespeare --task=hellaswag  # multiple choice, not the above
    python eval.py --init_from=gpt2 --out_dir=out-eval-gpt2 --mc_file=my_set.jsonl

Prints a table and writes it as JSON to out_dir/eval_<checkpoint>_<split>.json; checkpoints are
only read. The loss slides a window of block_size tokens over the split, `stride` tokens at a time,
so that every token but the first is scored exactly once, with block_size - stride + 1 to block_size
tokens of context (the first window's tokens with what precedes them). Unlike train.py's estimate
on a few random batches, the result is exact and the same on every run and for any batch_size.

With --task or --mc_file it scores a multiple-choice set instead (multiple_choice.py: acc and
acc_norm, as lm-evaluation-harness does) and writes out_dir/eval_<checkpoint>_<task>.json.
HellaSwag's file comes from `python data/hellaswag/prepare.py`.
"""

import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from configurator import cli
from nanogpt.checkpoint import load_model
from nanogpt.dataset import get_windows, open_dataset
from nanogpt.device import setup
from nanogpt.errors import UserError
from nanogpt.generation import check_sampling, generate
from nanogpt.multiple_choice import load_items, score

TASKS = {'hellaswag': os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   'data', 'hellaswag', 'val.jsonl')}


@dataclass
class EvalConfig:
    out_dir: str = 'out'  # the training run's folder; the JSON of results is written here too
    ckpt: str = 'best.pt'  # which checkpoint in out_dir (an absolute path reads one from elsewhere)
    # 'resume' (the checkpoint above), or a GPT-2: 'gpt2'...'gpt2-xl' or a local HF folder
    init_from: str = 'resume'
    dataset: str = ''  # a folder under data/; '' = the dataset the checkpoint was trained on
    data_dir: str = ''  # read the dataset from here instead of data/<dataset>
    split: str = 'val'  # 'val' or 'train'
    # loss
    block_size: int = 0  # tokens of context per window; 0 = the model's block_size
    # tokens a window advances; 0 = block_size // 2. Smaller: more context per token, slower
    stride: int = 0
    # windows per forward pass; the logits take batch_size x block_size x vocab_size x 4 bytes
    batch_size: int = 8
    max_tokens: int = 0  # evaluate only the first max_tokens of the split (quick runs); 0 = all
    # BLEU
    bleu_samples: int = 100  # prompts drawn from the split; 0 skips BLEU
    bleu_prompt_tokens: int = 128  # tokens of real text the model continues
    bleu_tokens: int = 128  # tokens of the real and of the generated continuation
    # 0 is greedy decoding; > 0 samples, and the texts then also depend on batch_size
    temperature: float = 0.0
    top_k: int | None = None  # when sampling, only among the k most likely tokens; None for all
    seed: int = 1337  # draws the prompts (and the samples when temperature > 0)
    # multiple choice: either replaces the loss and BLEU
    task: str = ''  # 'hellaswag' (data/hellaswag/val.jsonl, see its prepare.py)
    mc_file: str = ''  # or any multiple-choice JSONL file (format in multiple_choice.py)
    mc_items: int = 0  # score only the first mc_items items (quick runs); 0 = all
    # system
    device: str = 'auto'  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    # float32 for exact figures; 'bfloat16' is faster on GPUs (logits are still scored in fp32)
    dtype: str = 'float32'


def check_config(cfg):
    if cfg.split not in ('train', 'val'):
        raise UserError(f"split must be 'train' or 'val', got {cfg.split!r}")
    for key in ('batch_size', 'bleu_prompt_tokens', 'bleu_tokens'):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in ('block_size', 'stride', 'max_tokens', 'bleu_samples'):
        if getattr(cfg, key) < 0:
            raise UserError(f"{key} must be zero or more, got {getattr(cfg, key)}")
    check_sampling(cfg)
    if cfg.task and cfg.task not in TASKS:
        raise UserError(f"unknown task {cfg.task!r}: one of {', '.join(TASKS)}, "
                        "or --mc_file=FILE.jsonl for your own")
    if cfg.task and cfg.mc_file:
        raise UserError("give --task or --mc_file, not both")
    if cfg.mc_items < 0:
        raise UserError(f"mc_items must be zero or more, got {cfg.mc_items}")
    if cfg.init_from != 'resume' and not (cfg.dataset or cfg.data_dir or cfg.task or cfg.mc_file):
        raise UserError(f"say which data to evaluate {cfg.init_from} on: "
                        "--dataset=NAME (a folder under data/) or --data_dir=DIR")


def import_sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise UserError("BLEU needs sacrebleu: pip install -e .[eval] "
                        "(or skip BLEU with --bleu_samples=0)") from None
    return sacrebleu


def progress_bar(**kwargs):
    try:
        from tqdm import tqdm
    except ImportError:
        raise UserError("the progress bar needs tqdm: pip install -e .[eval]") from None
    return tqdm(**kwargs)


# --------------------------------------------------------------------------------------------------
# loss over a whole split

def sliding_windows(n, block_size, stride):
    """Where the windows over a stream of n tokens start, and how many targets each one scores.
    The window starting at b reads tokens b .. b + block_size and predicts the last block_size of
    them. The first window scores all its targets; each later one starts `stride` tokens further and
    scores only the targets the previous ones did not, at its end where they have the most context.
    The last window is moved back to end at the end of the stream, so all windows have the same
    length. Together they score tokens 1 .. n-1, each exactly once. Needs n > block_size."""
    begins, scored = [0], [block_size]
    end = block_size  # the last token scored so far
    while end < n - 1:
        b = min(begins[-1] + stride, n - 1 - block_size)
        begins.append(b)
        scored.append(b + block_size - end)
        end = b + block_size
    return begins, scored


@torch.no_grad()
def split_loss(model, data, block_size, stride, batch_size, device='cpu', ctx=nullcontext(),
               progress=True):
    """Sum of the next-token losses (nats) of tokens 1 .. len(data)-1 of `data`, and their count."""
    begins, scored = sliding_windows(len(data), block_size, stride)
    bar = progress_bar(total=sum(scored), unit='tok', desc='loss', disable=not progress)
    window_nats = []
    for i in range(0, len(begins), batch_size):
        x, y = get_windows(data, begins[i:i + batch_size], block_size, device)  # (B, T) each
        n_new = torch.tensor(scored[i:i + batch_size], device=device)  # (B,)
        # targets the previous window already scored get -1, which cross_entropy ignores (loss 0);
        # out of place, as y may share memory with x
        y = y.masked_fill(torch.arange(block_size, device=device) < block_size - n_new[:, None], -1)
        with ctx:
            _, nats = model(x, y, reduction='none')  # (B*T,), in fp32 also under autocast
        # one sum per window, added up below in window order: the total doesn't depend on batch_size
        window_nats += nats.view(len(n_new), block_size).double().sum(1).tolist()
        bar.update(int(n_new.sum()))
    bar.close()
    return sum(window_nats), sum(scored)


def text_size(data, tokenizer):
    """UTF-8 bytes and characters of the text of all tokens of `data` (counted per token id, so the
    split is read in chunks rather than decoded whole)."""
    n_bytes, n_chars = (np.array(s, dtype=np.int64) for s in tokenizer.text_sizes())
    counts = np.zeros(len(n_bytes), dtype=np.int64)
    for i in range(0, len(data), 2**24):
        counts += np.bincount(data[i:i + 2**24], minlength=len(n_bytes))
    return int(counts @ n_bytes), int(counts @ n_chars)


# --------------------------------------------------------------------------------------------------
# BLEU of generated text

def draw_prompts(data, n, prompt_tokens, tokens, seed):
    """n distinct non-overlapping spans of the split at random, from torch.Generator(seed): each one
    a prompt (prompt_tokens) and its real continuation (tokens). Returns two int64 arrays."""
    span = prompt_tokens + tokens
    if n > len(data) // span:
        raise UserError(f"the split holds only {len(data) // span} spans of {span} tokens "
                        "for BLEU: use a smaller --bleu_samples, --bleu_prompt_tokens "
                        "or --bleu_tokens")
    g = torch.Generator().manual_seed(seed)
    offsets = (torch.randperm(len(data) // span, generator=g)[:n] * span).tolist()
    w = np.stack([data[o:o + span] for o in offsets]).astype(np.int64)
    return w[:, :prompt_tokens], w[:, prompt_tokens:]


def corpus_bleu(hypotheses, references):
    """Corpus BLEU (Papineni et al. 2002) of the texts against one reference each, with sacrebleu's
    defaults: 13a word tokenization (newlines are spaces), case-sensitive, exponential smoothing.
    BLEU = brevity penalty x geometric mean of the 1- to 4-gram precisions, as a percentage; the
    signature names the choices above, so that scores can be compared."""
    bleu = import_sacrebleu().BLEU()
    result = bleu.corpus_score(hypotheses, [references])
    return {'bleu': result.score, 'bleu_precisions': result.precisions,
            'bleu_brevity_penalty': result.bp, 'bleu_signature': str(bleu.get_signature())}


def generate_continuations(model, prompts, cfg, device, ctx):
    """The model's continuation of each prompt (B, P): (B, bleu_tokens) token ids."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    bar = progress_bar(total=len(prompts), unit='sample', desc='BLEU')
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        idx = torch.from_numpy(prompts[i:i + cfg.batch_size]).to(device)
        with ctx:
            y = generate(model, idx, cfg.bleu_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                         generator=generator)
        out += y[:, idx.size(1):].tolist()
        bar.update(len(idx))
    bar.close()
    return out


# --------------------------------------------------------------------------------------------------

def describe(vocab):
    if vocab['kind'] == 'char':
        return f"{len(vocab['chars'])} characters"
    if vocab['kind'] == 'bpe':
        return f"BPE of {len(vocab['merges']) + 257} tokens trained here"
    return f"BPE {vocab.get('encoding')}"


def write_json(obj, path):
    """Write to a temporary file and rename it into place: readers never see half a file."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def multiple_choice(cfg, model, tokenizer, name, device, ctx):
    """Score a multiple-choice set; its results as a dict, written as JSON like the loss's."""
    path = TASKS.get(cfg.task, cfg.mc_file)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found" + (": run `python data/hellaswag/prepare.py` first"
                                               if cfg.task == 'hellaswag' else ""))
    items = load_items(path)[:cfg.mc_items or None]
    task = cfg.task or os.path.splitext(os.path.basename(path))[0]
    print(f"evaluating {name} ({model.get_num_params() / 1e6:.2f}M parameters) on {task}: "
          f"{len(items):,} items, {sum(len(it['endings']) for it in items):,} endings, "
          f"{device}, {cfg.dtype}")
    bar = progress_bar(total=sum(len(it['endings']) for it in items), unit='ending', desc=task)
    results = score(model, tokenizer, items, cfg.batch_size, device, ctx, bar)
    bar.close()
    if results['skipped']:
        print(f"skipped {results['skipped']:,} of {len(items):,} items: {task} needs text the "
              f"model's vocabulary ({describe(tokenizer.spec)}) covers, and endings that fit its "
              f"context of {model.config.block_size} tokens")
    n = results['scored']
    chance = sum(1 / len(it['endings']) for it in items) / len(items)
    print(f"{'acc':<9} {results['acc']:.4f} ± {results['acc_stderr']:.4f}  (summed log-prob)\n"
          f"{'acc_norm':<9} {results['acc_norm']:.4f} ± {results['acc_norm_stderr']:.4f}  "
          f"(log-prob per character of the ending)\n"
          f"on {n:,} items (chance: {chance:.4f})")
    results = {'model': name, 'task': task, 'file': path, **results, 'config': asdict(cfg)}
    os.makedirs(cfg.out_dir, exist_ok=True)
    out = os.path.join(cfg.out_dir, f'eval_{tag_of(cfg)}_{task}.json')
    write_json(results, out)
    print(f"results written to {out}")
    return results


def tag_of(cfg):
    """What the JSON's name says was evaluated: the checkpoint's name, or the GPT-2's."""
    return os.path.splitext(os.path.basename(cfg.ckpt))[0] if cfg.init_from == 'resume' else \
        os.path.basename(os.path.normpath(cfg.init_from))


def main(cfg):
    check_config(cfg)
    if cfg.task or cfg.mc_file:
        dev = setup(cfg.device, cfg.dtype)
        model, tokenizer, ckpt = load_model(cfg.init_from, cfg.out_dir, cfg.ckpt)
        model.to(dev.device)
        name = os.path.join(cfg.out_dir, cfg.ckpt) if ckpt else cfg.init_from
        return multiple_choice(replace(cfg, device=dev.device, dtype=dev.dtype), model, tokenizer,
                               name, dev.device, dev.autocast)
    if cfg.bleu_samples:
        import_sacrebleu()  # fail now rather than after the whole split
    dev = setup(cfg.device, cfg.dtype)
    device, dtype, ctx = dev.device, dev.dtype, dev.autocast

    model, tokenizer, ckpt = load_model(cfg.init_from, cfg.out_dir, cfg.ckpt)
    model.to(device)
    name = os.path.join(cfg.out_dir, cfg.ckpt) if ckpt else cfg.init_from
    trained_on = {k: ckpt['config'].get(k, '') if ckpt else '' for k in ('dataset', 'data_dir')}
    if cfg.block_size > model.config.block_size:
        raise UserError(f"block_size {cfg.block_size} is larger than the model's "
                        f"{model.config.block_size}, which has no position embeddings beyond it: "
                        "use --block_size=0 (the model's)")
    block_size = cfg.block_size or model.config.block_size
    stride = cfg.stride or max(1, block_size // 2)
    if stride > block_size:
        raise UserError(f"stride {stride} is larger than block_size {block_size}: "
                        "tokens between windows would never be scored")
    # the data defaults to what the checkpoint was trained on;
    # naming a dataset resets its folder too
    dataset = cfg.dataset or trained_on['dataset']
    data_dir = cfg.data_dir or ('' if cfg.dataset else trained_on['data_dir'])
    # resolved, as the JSON records them
    cfg = replace(cfg, dataset=dataset, data_dir=data_dir, block_size=block_size, stride=stride,
                  device=device, dtype=dtype)
    vocab, splits = open_dataset(dataset, data_dir, block_size, splits=(cfg.split,))
    if vocab != tokenizer.spec:
        raise UserError(f"{name} was trained with another vocabulary ({describe(tokenizer.spec)}) "
                        f"than dataset '{dataset}' ({describe(vocab)}): "
                        "evaluate it on data tokenized as it was trained")
    data = splits[cfg.split][:cfg.max_tokens or None]
    if len(data) <= block_size:
        raise UserError(f"max_tokens {cfg.max_tokens} leaves too few tokens for one window of "
                        f"{block_size}: use a larger --max_tokens (or 0 for the whole split)")
    if cfg.bleu_samples:  # checked now rather than after the whole loss pass
        prompts, real = draw_prompts(data, cfg.bleu_samples, cfg.bleu_prompt_tokens,
                                     cfg.bleu_tokens, cfg.seed)
    print(f"evaluating {name} ({model.get_num_params() / 1e6:.2f}M parameters) "
          f"on {dataset} {cfg.split}: "
          f"{len(data):,} tokens, windows of {block_size} every {stride}, {device}, {dtype}")

    nats, n_scored = split_loss(model, data, block_size, stride, cfg.batch_size, device, ctx)
    # Token 0 is never scored (nothing precedes it), so the text measured is that of tokens 1..n-1:
    # their UTF-8 bytes, and the characters whose first byte is among them
    # (see Tokenizer.text_sizes).
    n_bytes, n_chars = text_size(data[1:], tokenizer)
    bits = nats / math.log(2)
    loss = nats / n_scored
    results = {
        'model': name, 'dataset': dataset, 'split': cfg.split, 'tokens': len(data),
        'scored_tokens': n_scored, 'scored_bytes': n_bytes, 'scored_characters': n_chars,
        'loss': loss,  # mean nats per scored token
        'perplexity': math.exp(loss) if loss < 709 else math.inf,  # exp(709.8) overflows
        'bits_per_token': bits / n_scored,
        'bits_per_character': bits / n_chars,
        'bits_per_byte': bits / n_bytes,
        # a character-level model's tokens are characters; a BPE model's are compared by bytes
        'unit': 'character' if vocab['kind'] == 'char' else 'byte',
    }
    if cfg.bleu_samples:
        generated = generate_continuations(model, prompts, cfg, device, ctx)
        references = [tokenizer.decode(r) for r in real.tolist()]
        hypotheses = [tokenizer.decode(g) for g in generated]
        results.update(corpus_bleu(hypotheses, references))
        results['bleu_texts'] = [{'prompt': tokenizer.decode(p), 'reference': r, 'generation': h}
                                 for p, r, h in zip(prompts.tolist(), references, hypotheses)]
    results['config'] = asdict(cfg)

    own = {results['unit']: '  (the unit of this vocabulary)'}
    rows = [('loss (nats/token)', f"{loss:.4f}"), ('perplexity', f"{results['perplexity']:.3f}"),
            ('bits per token', f"{results['bits_per_token']:.4f}"),
            ('bits per character',
             f"{results['bits_per_character']:.4f}" + own.get('character', '')),
            ('bits per byte', f"{results['bits_per_byte']:.4f}" + own.get('byte', ''))]
    if cfg.bleu_samples:
        precisions = '/'.join(f'{p:.1f}' for p in results['bleu_precisions'])
        rows.append(('BLEU', f"{results['bleu']:.2f}  (1- to 4-gram precisions {precisions} %, "
                             f"brevity penalty {results['bleu_brevity_penalty']:.3f}; "
                             f"{results['bleu_signature']})"))
    print(f"{n_scored:,} tokens scored ({n_chars:,} characters, {n_bytes:,} UTF-8 bytes)")
    for label, value in rows:
        print(f"{label:<20} {value}")
    if cfg.bleu_samples:
        example = results['bleu_texts'][0]
        print(f"example prompt:\n{example['prompt']}\nreal continuation:\n{example['reference']}\n"
              f"generated:\n{example['generation']}")

    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, f'eval_{tag_of(cfg)}_{cfg.split}.json')
    write_json(results, path)
    print(f"results written to {path}")
    return results


if __name__ == '__main__':
    cli(main, EvalConfig)
