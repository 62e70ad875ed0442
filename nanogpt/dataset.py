"""
A dataset prepared by data/<name>/prepare.py: train.bin and val.bin (uint16 token ids, no header)
and meta.json (the vocabulary spec). The bins are memory-mapped, never loaded whole.

Batches are a function of (seed, split, index) only: a run sees the same data whatever the number of
processes, and a resumed run the same data as one that never stopped.

A conversation dataset (data/chat/prepare.py) also has train_mask.bin and val_mask.bin (uint8, one
per token: 1 where the token is one to learn, the assistant's). Its splits carry their mask as
`.mask`, and get_batch sets the targets of the other tokens to -1, which the loss ignores: training
and estimate_loss then count the assistant's tokens only, with no change to the loop.
"""

import itertools
import json
import os
from contextlib import nullcontext

import numpy as np
import torch

from nanogpt.errors import UserError
from nanogpt.prepare import file_sha256

# the repo's data/ folder, where data/<name>/prepare.py writes (this file is in nanogpt/)
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')


def open_dataset(dataset, data_dir='', block_size=1, splits=('train', 'val')):
    """The dataset's vocabulary spec and its splits {'train': ..., 'val': ...} as read-only memmaps.
    data_dir overrides data/<dataset>; each split must hold more than block_size tokens. The bins
    are checked against what meta.json recorded when they were written (size, SHA-256, largest
    id; the hash for bins up to 1 GiB), so a half-written or mixed dataset is refused rather than
    trained on."""
    data_dir = data_dir or os.path.join(DATA, dataset)
    prepare = f"python {os.path.join('data', dataset, 'prepare.py')}"
    meta = read_meta(data_dir, dataset, prepare)
    out = {}
    for split in splits:
        path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing: run `{prepare}` again")
        size = os.path.getsize(path)
        recorded = meta.get(split)
        # the full hash reads the whole file (~4 s a GiB here: a minute for OpenWebText's train.bin
        # at every start), so a bin over 1 GiB is checked by its size only
        if size % 2 or (recorded and (size != recorded['bytes'] or size <= 2**30
                                      and file_sha256(path) != recorded['sha256'])):
            raise UserError(f"{path} is not the file meta.json beside it describes (an interrupted "
                            f"or mixed prepare run?): run `{prepare}` again")
        data = np.memmap(path, dtype=np.uint16, mode='r') if size else np.zeros(0, np.uint16)
        # ids beyond the vocabulary would index past the embedding (on CUDA a device-side assert)
        max_id = recorded['max_id'] if recorded else int(data.max(initial=0))
        if max_id >= meta['vocab_size']:
            raise UserError(f"{path} holds token id {max_id}, outside the vocabulary of "
                            f"{meta['vocab_size']}: run `{prepare}` again")
        if len(data) <= block_size:
            raise UserError(f"the {split} split of '{dataset}' has {len(data)} tokens, too few for "
                            f"block_size {block_size}: use a smaller --block_size or more text")
        if recorded and 'mask' in recorded:
            mask_path = os.path.join(data_dir, f'{split}_mask.bin')
            if (not os.path.isfile(mask_path) or os.path.getsize(mask_path) != len(data)
                    or len(data) <= 2**30 and file_sha256(mask_path) != recorded['mask']['sha256']):
                raise UserError(f"{mask_path} is missing or is not the file meta.json beside it "
                                f"describes: run `{prepare}` again")
            data.mask = np.memmap(mask_path, dtype=np.uint8, mode='r')
        out[split] = data
    return meta['vocab'], out


def val_sha256(dataset, data_dir=''):
    """The SHA-256 of the dataset's val.bin as its meta.json records it (None for older datasets):
    what identifies the data a run's val losses are measured on."""
    data_dir = data_dir or os.path.join(DATA, dataset)
    return read_meta(data_dir, dataset, '').get('val', {}).get('sha256')


def read_meta(data_dir, dataset, prepare):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise UserError(f"dataset '{dataset}' not found in {data_dir}: run `{prepare}` first")
    try:
        with open(path) as f:
            meta = json.load(f)
        spec = meta['vocab']
        size = len(spec['chars']) if spec['kind'] == 'char' else 2**16
        meta.setdefault('vocab_size', size)  # older datasets did not always record it
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is malformed ({type(e).__name__}: {e}): run `{prepare}` "
                        "again") from None
    return meta


def batch_seed(seed, split, index):
    """The generator seed of one batch: a function of (seed, split, index) only."""
    stream = {'train': 0, 'val': 1, 'eval_train': 2, 'eval_val': 3}[split]
    return (seed * 4 + stream) * 2**32 + index


def get_windows(data, offsets, block_size, device='cpu'):
    """Inputs x and targets y (len(offsets), block_size) of the windows of `data`
    starting at `offsets`."""
    w = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in offsets]).astype(np.int64))
    # y is x shifted by one: each position predicts the next
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
    if device.startswith('cuda'):
        # pinned host memory lets the copy run asynchronously while the GPU works
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def get_batch(data, block_size, batch_size, seed, rows=None, device='cpu'):
    """x, y (B, block_size) from random windows of `data`, drawn from torch.Generator(seed); `rows`
    picks a slice of them (one process's micro-batch of a step's global batch). Where data has a
    mask (a conversation dataset), y is -1 where the target token is not one to learn: position t
    counts in the loss iff token t + 1 of its window is marked in the mask."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(len(data) - block_size, (batch_size,), generator=g).tolist()
    if rows is not None:
        offsets = offsets[rows]
    x, y = get_windows(data, offsets, block_size, device)
    mask = getattr(data, 'mask', None)
    if mask is not None:
        _, learn = get_windows(mask, offsets, block_size, device)  # the targets' marks (B, T)
        y = y.masked_fill(learn == 0, -1)
    return x, y


def train_batches(data, cfg, start_step=0, rank=0, world_size=1, device='cpu'):
    """This process's micro-batches, in order, from step start_step on. A step's global batch is
    gradient_accumulation_steps x batch_size windows; process `rank` takes its consecutive share of
    micro-batches, so that 2 processes x 2 micro-steps see what 1 process x 4 micro-steps sees.
    A large train.bin (over 1 GiB) is memory-mapped anew for each batch: one kept open keeps every
    page it has read mapped, so over a long run the process's resident memory grows to the size of
    the file (measured in docs/gpu.md); a smaller one stays open, as re-opening costs more time per
    batch than its pages cost memory."""
    local_accum = cfg.gradient_accumulation_steps // world_size
    global_rows = cfg.gradient_accumulation_steps * cfg.batch_size
    path = getattr(data, 'filename', None)  # None for an array in memory (bench.py's tokens)
    reopen = path is not None and os.path.getsize(path) > 2**30
    mask = getattr(data, 'mask', None)
    for step in itertools.count(start_step):
        for micro in range(local_accum):
            if reopen:
                data = np.memmap(path, dtype=np.uint16, mode='r')
                if mask is not None:
                    data.mask = mask
            first = (rank * local_accum + micro) * cfg.batch_size
            yield get_batch(data, cfg.block_size, global_rows, batch_seed(cfg.seed, 'train', step),
                            rows=slice(first, first + cfg.batch_size), device=device)


@torch.no_grad()
def estimate_loss(model, splits, eval_iters, batch_size, block_size, seed, device='cpu', ctx=None,
                  stop=None):
    """Mean loss over eval_iters random batches per split: an estimate, quick enough to run during
    training. The batches are the same at every call, so two estimates differ only by the model.
    stop: a function asked before each batch; once it returns true, the estimate ends (None)."""
    out = {}
    was_training = model.training
    model.eval()
    for split, data in splits.items():
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            if stop and stop():
                model.train(was_training)
                return None
            x, y = get_batch(data, block_size, batch_size, batch_seed(seed, 'eval_' + split, k),
                             device=device)
            with ctx or nullcontext():
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train(was_training)
    return out
