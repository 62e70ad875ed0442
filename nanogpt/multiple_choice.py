"""
Multiple-choice benchmarks (HellaSwag and any set in the same format): which ending of a context the
model finds most likely, scored as lm-evaluation-harness scores its `multiple_choice` tasks.

The format is JSON Lines, one item per line:
    {"context": "A man is sitting on a roof. He", "endings": ["starts pulling up roofing.", ...],
     "label": 0}
context: non-empty text; endings: two or more non-empty strings; label: the index of the right one.
Each ending is scored as a continuation of the context after one space, `context + " " + ending`
(lm-evaluation-harness's default target_delimiter), so write neither a trailing space on the
context nor a leading one on the endings. Other keys on a line are kept but not read.

For each item and ending, ll = the summed log-probability (nats) of the ending's tokens given the
context. Then
    acc      = the label's ending has the largest ll
    acc_norm = the label's ending has the largest ll / len(ending), len in characters
(lm-evaluation-harness divides by the length of the ending string as written in the task, without
the delimiter; for ASCII text characters are bytes). Ties go to the first ending, as numpy's argmax.
"""

import math
import os
from contextlib import nullcontext

import torch

from nanogpt.errors import UserError
from nanogpt.prepare import read_jsonl


def load_items(path):
    """The items of a multiple-choice JSONL file, each checked, as a list of dicts."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found" + (": run `python data/hellaswag/prepare.py` first"
                                               if 'hellaswag' in path else ""))
    items = []
    for line_no, item in read_jsonl(path):
        endings, label = item.get('endings'), item.get('label')
        if (not isinstance(item.get('context'), str) or not item['context'].strip()
                or not isinstance(endings, list) or len(endings) < 2
                or not all(isinstance(e, str) and e for e in endings)
                or type(label) is not int or not 0 <= label < len(endings)):  # true: a bool
            raise UserError(f"{path}:{line_no}: an item needs a non-empty 'context', a list "
                            "of two or more non-empty 'endings' and an int 'label' indexing "
                            "them")
        items.append(item)
    if not items:
        raise UserError(f"{path} holds no items")
    return items


def encode_pair(tokenizer, context, continuation):
    """Token ids of the context and of the continuation, split as lm-evaluation-harness splits them:
    the whole text is encoded at once and the continuation is what follows the context's own
    encoding (a BPE may merge across the boundary otherwise), with trailing spaces of the context
    moved onto the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    return whole[:n_context], whole[n_context:]


def encode_items(tokenizer, items):
    """Per item, the (context ids, continuation ids) of each ending; None for an item holding text
    the vocabulary cannot encode (a character-level model's characters)."""
    encoded = []
    for item in items:
        try:
            encoded.append([encode_pair(tokenizer, item['context'], ' ' + e)
                            for e in item['endings']])
        except UserError:
            encoded.append(None)
    return encoded


def windows(pairs, block_size):
    """Input and target rows for (context, continuation) id pairs: the last block_size + 1 tokens
    of context + continuation (lm-evaluation-harness cuts long contexts the same way, from the
    left), the input all but the last, the targets all but the first, -1 (not scored) on the
    context."""
    rows = []
    for ctx, cont in pairs:
        w = (ctx + cont)[-(block_size + 1):]
        targets = [-1] * (len(w) - 1 - len(cont)) + cont
        rows.append((w[:-1], targets))
    return rows


@torch.no_grad()
def loglikelihoods(model, rows, batch_size, device='cpu', ctx=nullcontext(), bar=None):
    """The summed log-probability (nats, float64) of the scored targets of each (input, targets)
    row. Rows are padded on the right to the longest in their batch: causal attention keeps the
    padding from changing the positions before it, and padded targets are -1."""
    out = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        T = max(len(x) for x, _ in batch)
        x = torch.zeros(len(batch), T, dtype=torch.long)  # (B, T)
        y = torch.full((len(batch), T), -1, dtype=torch.long)  # (B, T)
        for b, (xs, ys) in enumerate(batch):
            x[b, :len(xs)] = torch.tensor(xs)
            y[b, :len(ys)] = torch.tensor(ys)
        with ctx:
            _, nats = model(x.to(device), y.to(device), reduction='none')  # (B*T,)
        out += (-nats.view(len(batch), T).double().sum(1)).tolist()
        if bar is not None:
            bar.update(len(batch))
    return out


def score(model, tokenizer, items, batch_size=16, device='cpu', ctx=nullcontext(), bar=None):
    """Score every item: a dict of acc, acc_norm (means over the scored items), their standard
    errors, the counts, and per item the ll of each ending (None for skipped items)."""
    block_size = model.config.block_size
    encoded = encode_items(tokenizer, items)
    # an ending longer than the model's context has no window holding it all: skipped too
    encoded = [e if e is not None and all(len(cont) <= block_size for _, cont in e) else None
               for e in encoded]
    rows = windows([pair for e in encoded if e is not None for pair in e], block_size)
    lls = iter(loglikelihoods(model, rows, batch_size, device, ctx, bar))
    correct, correct_norm, per_item = [], [], []
    for item, e in zip(items, encoded):
        if e is None:
            per_item.append(None)
            continue
        ll = [next(lls) for _ in e]
        per_item.append(ll)
        norm = [v / len(ending) for v, ending in zip(ll, item['endings'])]
        correct.append(argmax(ll) == item['label'])
        correct_norm.append(argmax(norm) == item['label'])
    n = len(correct)
    if n == 0:
        raise UserError("no item could be scored: every one holds text the model's vocabulary "
                        "cannot encode, or an ending longer than its context (block_size)")
    acc, acc_norm = sum(correct) / n, sum(correct_norm) / n
    return {'acc': acc, 'acc_stderr': stderr(acc, n), 'acc_norm': acc_norm,
            'acc_norm_stderr': stderr(acc_norm, n), 'items': len(items), 'scored': n,
            'skipped': len(items) - n, 'loglikelihoods': per_item}


def accuracy(model, tokenizer, items, device='cpu', ctx=nullcontext(), rank=0, world_size=1,
             batch_size=32):
    """acc and acc_norm of `items` as a training run logs them beside its val loss: process `rank`
    of world_size scores items[rank::world_size] and the counts are summed over all processes
    (every process must call this; world_size=1 scores all items here). The model is put in eval
    mode (no dropout) for the scoring and back as it was."""
    was_training = model.training
    model.eval()
    part = score(model, tokenizer, items[rank::world_size], batch_size, device, ctx)
    model.train(was_training)
    n = part['scored']
    counts = torch.tensor([part['acc'] * n, part['acc_norm'] * n, n], dtype=torch.float64,
                          device=device)
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    correct, correct_norm, n = counts.round().tolist()
    return {'mc_acc': correct / n, 'mc_acc_norm': correct_norm / n}


def argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima


def stderr(p, n):
    """The standard error of a mean of n 0/1 outcomes, sample standard deviation / sqrt(n), as
    lm-evaluation-harness reports it."""
    return math.sqrt(p * (1 - p) * n / (n - 1) / n) if n > 1 else float('nan')
