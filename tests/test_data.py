"""Datasets: prepare scripts and the batches train.py draws from them."""

import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import run_script
from nanogpt.dataset import batch_seed, get_batch
from nanogpt.tokenizer import GPT2_VOCAB, Tokenizer, char_vocab


def read_bins(data_dir):
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    ids = {s: np.fromfile(os.path.join(data_dir, f'{s}.bin'), dtype=np.uint16)
           for s in ('train', 'val')}
    return meta, ids


def test_char_prepare_decodes_back_to_the_input(char_data, shakespeare_text):
    meta, ids = read_bins(char_data)
    tok = Tokenizer(meta['vocab'])
    assert meta['vocab_size'] == 65 and tok.vocab_size == 65
    assert (len(ids['train']), len(ids['val'])) == (1_003_854, 111_540)  # the 90/10 split
    assert tok.decode(ids['train'].tolist()) + tok.decode(ids['val'].tolist()) == shakespeare_text


@pytest.mark.slow
def test_prepare_reports_missing_and_non_utf8_input(tmp_path):
    r = run_script('data/shakespeare_char/prepare.py', '--input', str(tmp_path / 'nope.txt'),
                   '--out_dir', str(tmp_path))
    assert r.returncode == 2 and 'input file' in r.stderr and 'not found' in r.stderr
    bad = tmp_path / 'latin1.txt'
    bad.write_bytes('caf'.encode() + 'é'.encode('latin-1') + b' au lait')
    r = run_script('data/shakespeare_char/prepare.py', '--input', str(bad),
                   '--out_dir', str(tmp_path))
    assert r.returncode == 2 and 'not UTF-8 text: byte 0xe9 at offset 3' in r.stderr
    assert not os.path.exists(tmp_path / 'train.bin')


def test_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    import requests

    from nanogpt.errors import UserError
    from nanogpt.prepare import read_text

    def offline(*args, **kwargs):
        raise requests.ConnectionError('no network')
    monkeypatch.setattr(requests, 'get', offline)
    target = tmp_path / 'input.txt'
    message = f'download it by hand to {target}, or pass --input FILE'
    with pytest.raises(UserError, match=re.escape(message)):
        read_text(None, 'https://example.invalid/input.txt', str(target))
    assert not target.exists()


def test_char_tokenizer_round_trip_and_unknown_characters():
    tok = Tokenizer(char_vocab('hello world'))
    assert tok.decode(tok.encode('hold')) == 'hold'
    from nanogpt.errors import UserError
    with pytest.raises(UserError, match=r"not in the model's vocabulary: 'XZ'"):
        tok.encode('hello XZX')


def test_batches_are_shifted_windows_of_the_data():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, block_size=16, batch_size=4, seed=7)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])  # y[t] is the token after x[t]
    # contiguous windows
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.long))


def test_batches_depend_only_on_the_seed_and_rows_slice_the_same_batch():
    data = np.random.default_rng(0).integers(0, 65, 5000).astype(np.uint16)
    seed = batch_seed(1337, 'train', 42)
    x1, _ = get_batch(data, 16, 8, seed)
    x2, _ = get_batch(data, 16, 8, seed)
    part, _ = get_batch(data, 16, 8, seed, rows=slice(4, 8))
    assert torch.equal(x1, x2) and torch.equal(part, x1[4:])
    other, _ = get_batch(data, 16, 8, batch_seed(1337, 'train', 43))
    assert not torch.equal(other, x1)
    # a seed of its own for each split and step
    splits = ('train', 'val', 'eval_train', 'eval_val')
    assert len({batch_seed(1, s, i) for s in splits for i in range(3)}) == 12


def test_bpe_prepare_gives_the_reference_token_counts_and_decodes_back(bpe_data, shakespeare_text,
                                                                       gpt2_bpe):
    meta, ids = read_bins(bpe_data)
    assert meta['vocab'] == GPT2_VOCAB and meta['vocab_size'] == 50257
    assert (len(ids['train']), len(ids['val'])) == (301_966, 36_059)  # the reference's counts
    assert (meta['train_tokens'], meta['val_tokens']) == (301_966, 36_059)
    text = gpt2_bpe.decode(ids['train'].tolist()) + gpt2_bpe.decode(ids['val'].tolist())
    assert text == shakespeare_text
    # GPT-2's ids (r50k_base is GPT-2's BPE)
    assert gpt2_bpe.encode('Hello world') == [15496, 995]
