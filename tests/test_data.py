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


@pytest.mark.slow
def test_openwebtext_prepare_keeps_each_local_document_once_ending_in_end_of_text(tmp_path,
                                                                                  gpt2_bpe):
    docs = [f"Document {i}: {'some words ' * i}\n" for i in range(8)]
    docs += ['no trailing newline, non-ASCII: café ✓',
             'a literal <|endoftext|> is text, not a boundary\n\n']
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    for i, doc in enumerate(docs):
        (corpus / f'{i:02d}.txt').write_text(doc, encoding='utf-8')
    r = run_script('data/openwebtext/prepare.py', '--input', str(corpus),
                   '--out_dir', str(tmp_path / 'out'), '--num_proc=2', '--val_fraction=0.2',
                   env={'HF_DATASETS_CACHE': str(tmp_path / 'cache'), 'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 0, r.stderr
    meta, ids = read_bins(tmp_path / 'out')
    assert meta['vocab'] == GPT2_VOCAB and meta['train_tokens'] == len(ids['train'])
    eot = gpt2_bpe.eot_token
    found = {}
    for split in ('train', 'val'):
        # every document, the last one too, is followed by <|endoftext|>
        assert ids[split][-1] == eot
        ends = np.flatnonzero(ids[split] == eot)
        starts = np.concatenate([[0], ends[:-1] + 1])
        found[split] = [gpt2_bpe.decode(ids[split][s:e].tolist()) for s, e in zip(starts, ends)]
    assert len(found['val']) == 2  # ceil(0.2 * 10) documents held out
    # each document once, byte for byte
    assert sorted(found['train'] + found['val']) == sorted(docs)


def test_openwebtext_reads_a_dataset_saved_with_save_to_disk(tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict

    from data.openwebtext.prepare import load_corpus
    monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'cache'))
    docs = [f'document {i}' for i in range(5)]
    Dataset.from_dict({'text': docs, 'url': ['u'] * 5}).save_to_disk(str(tmp_path / 'ds'))
    DatasetDict({'train': Dataset.from_dict({'text': docs})}).save_to_disk(str(tmp_path / 'dsd'))
    assert list(load_corpus(str(tmp_path / 'ds'), num_proc=1)['text']) == docs
    assert list(load_corpus(str(tmp_path / 'dsd'), num_proc=1)['text']) == docs
