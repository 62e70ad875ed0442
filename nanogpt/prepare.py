"""
What every data/<name>/prepare.py shares: finding the raw text (a local file, or a download), and
writing token ids as the headerless uint16 train.bin/val.bin plus meta.json that train.py reads.
"""

import hashlib
import json
import os

import numpy as np

from nanogpt.errors import UserError


def read_text(path, url=None, default_path=None):
    """The UTF-8 text at `path`; if none is given, at `default_path`,
    downloaded from `url` if missing."""
    if path is None:
        path = default_path
        if not os.path.isfile(path):
            download(url, path)
    elif not os.path.isfile(path):
        raise UserError(f"input file {path} not found")
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text: byte {raw[e.start]:#04x} at offset {e.start} "
                        "(convert it, e.g. iconv -f latin1 -t utf-8)") from None


def read_jsonl(path):
    """(line number, object) for each non-blank line of a JSONL file; a line that is not JSON is a
    UserError naming it."""
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None


def download(url, path):
    """url's bytes to path, showing the MB received; path appears only once all have arrived."""
    import requests
    print(f"downloading {url} to {path}")
    tmp = path + '.tmp'
    try:
        with requests.get(url, timeout=60, stream=True) as response:
            response.raise_for_status()
            total, done = int(response.headers.get('content-length', 0)), 0
            with open(tmp, 'wb') as f:
                for chunk in response.iter_content(2**20):
                    f.write(chunk)
                    done += len(chunk)
                    print(f"\r{done / 1e6:.1f} MB" + (f" of {total / 1e6:.1f} MB" if total else ''),
                          end='', flush=True)
            print()
    except requests.RequestException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({type(e).__name__}): download it by hand to "
                        f"{path}, or pass --input FILE") from None
    os.replace(tmp, path)  # never leave a half-written file where the next run would trust it


def write_split(ids, path):
    ids = np.asarray(ids)
    assert ids.size == 0 or ids.max() < 2**16, "token ids must fit in uint16"
    ids.astype(np.uint16).tofile(path)


def write_dataset(out_dir, train_ids, val_ids, vocab, vocab_size, masks=None):
    """train.bin and val.bin (uint16 token ids, no header) and meta.json (the vocabulary spec).
    masks: (train, val), one 0/1 per token (1: a token to learn, see dataset.get_batch), written as
    train_mask.bin and val_mask.bin (uint8)."""
    if vocab_size > 2**16:
        raise UserError(f"vocab_size {vocab_size} does not fit uint16 token ids")
    os.makedirs(out_dir, exist_ok=True)
    write_split(train_ids, os.path.join(out_dir, 'train.bin.tmp'))
    write_split(val_ids, os.path.join(out_dir, 'val.bin.tmp'))
    for split, mask in zip(('train', 'val'), masks or ()):
        np.asarray(mask, dtype=np.uint8).tofile(os.path.join(out_dir, f'{split}_mask.bin.tmp'))
    finish_dataset(out_dir, vocab, vocab_size, masked=masks is not None)


def finish_dataset(out_dir, vocab, vocab_size, masked=False):
    """Move train.bin.tmp and val.bin.tmp (and with masked, train_mask.bin.tmp and
    val_mask.bin.tmp) into place with a meta.json that records what they hold: the vocabulary, and
    per split its tokens, bytes, largest id and SHA-256 (and its mask's). meta.json moves last,
    so that until a prepare run has finished, the dataset in out_dir is the old one, or a mix that
    dataset.open_dataset refuses (its bins disagree with the meta.json beside them)."""
    meta = {'vocab': vocab, 'vocab_size': vocab_size}
    names = ['train.bin', 'val.bin'] + (['train_mask.bin', 'val_mask.bin'] if masked else [])
    for split in ('train', 'val'):
        tmp = os.path.join(out_dir, f'{split}.bin.tmp')
        ids = np.memmap(tmp, dtype=np.uint16, mode='r') if os.path.getsize(tmp) else np.zeros(0)
        if len(ids) == 0:
            raise UserError(f"the {split} split would be empty: give more text")
        max_id = int(ids.max())
        if max_id >= vocab_size:
            raise UserError(f"token id {max_id} in the {split} split is outside the vocabulary "
                            f"of {vocab_size}")
        meta[f'{split}_tokens'] = len(ids)
        meta[split] = {'tokens': len(ids), 'bytes': os.path.getsize(tmp), 'max_id': max_id,
                       'sha256': file_sha256(tmp)}
        del ids
        if masked:
            mask = os.path.join(out_dir, f'{split}_mask.bin.tmp')
            assert os.path.getsize(mask) == meta[split]['tokens'], "one mask byte per token"
            meta[split]['mask'] = {'targets': int(np.fromfile(mask, np.uint8).sum()),
                                   'sha256': file_sha256(mask)}
    with open(os.path.join(out_dir, 'meta.json.tmp'), 'w') as f:
        json.dump(meta, f, indent=1)
    for name in (*names, 'meta.json'):
        os.replace(os.path.join(out_dir, name + '.tmp'), os.path.join(out_dir, name))
    print(f"vocab_size {vocab_size:,}; train has {meta['train_tokens']:,} tokens, "
          f"val {meta['val_tokens']:,}; written to {out_dir}")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(2**24), b''):
            h.update(block)
    return h.hexdigest()


def split_and_write(text, vocab, out_dir, val_fraction=0.1):
    """Encode the first (1 - val_fraction) of the text as train, the rest as val, and write both.
    vocab: a vocabulary spec, or a function of the train text that makes one (a BPE is learned
    from train alone: val stays text the tokenizer never saw)."""
    import time

    from nanogpt.tokenizer import Tokenizer
    if not text.strip():
        raise UserError("the input text is empty: nothing to train on (the dataset in "
                        f"{out_dir} is left as it was)")
    cut = int(len(text) * (1 - val_fraction))
    train, val = text[:cut], text[cut:]
    if callable(vocab):
        t0 = time.perf_counter()
        vocab = vocab(train)
        print(f"learned the vocabulary from {len(train.encode('utf-8')):,} bytes of train text in "
              f"{time.perf_counter() - t0:.2f} s")
    tok = Tokenizer(vocab)
    t0 = time.perf_counter()
    train_ids, val_ids = tok.encode_corpus(train), tok.encode_corpus(val)
    print(f"encoded {len(text.encode('utf-8')):,} bytes into {len(train_ids) + len(val_ids):,} "
          f"tokens in {time.perf_counter() - t0:.2f} s")
    write_dataset(out_dir, train_ids, val_ids, vocab, tok.vocab_size)


def prepare_text_dataset(description, here, url, vocab_of):
    """The main of a one-text dataset (the Shakespeare scripts): --input FILE, or input.txt in
    `here`, downloaded from `url` if missing; vocab_of(text) gives the vocabulary spec;
    bins go to --out_dir."""
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--input',
                        help='local text file (default: input.txt here, downloaded if missing)')
    parser.add_argument('--out_dir', default=here,
                        help='where to write the bins (default: this folder)')
    args = parser.parse_args()
    text = read_text(args.input, url, os.path.join(here, 'input.txt'))
    split_and_write(text, vocab_of(text), args.out_dir)
