"""
What every data/<name>/prepare.py shares: finding the raw text (a local file, or a download), and
writing token ids as the headerless uint16 train.bin/val.bin plus meta.json that train.py reads.
"""

import json
import os

import numpy as np

from errors import UserError  # the prepare script put the repo root on sys.path


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


def download(url, path):
    import requests
    print(f"downloading {url} to {path}")
    try:
        response = requests.get(url, timeout=60)
        response.raise_for_status()
    except requests.RequestException as e:
        raise UserError(f"could not download {url} ({type(e).__name__}): download it by hand to "
                        f"{path}, or pass --input FILE") from None
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        f.write(response.content)
    os.replace(tmp, path)  # never leave a half-written file where the next run would trust it


def write_split(ids, path):
    ids = np.asarray(ids)
    assert ids.size == 0 or ids.max() < 2**16, "token ids must fit in uint16"
    ids.astype(np.uint16).tofile(path)


def write_dataset(out_dir, train_ids, val_ids, vocab, vocab_size):
    """train.bin and val.bin (uint16 token ids, no header) and meta.json (the vocabulary spec)."""
    if vocab_size > 2**16:
        raise UserError(f"vocab_size {vocab_size} does not fit uint16 token ids")
    os.makedirs(out_dir, exist_ok=True)
    write_split(train_ids, os.path.join(out_dir, 'train.bin'))
    write_split(val_ids, os.path.join(out_dir, 'val.bin'))
    write_meta(out_dir, vocab, vocab_size, len(train_ids), len(val_ids))


def write_meta(out_dir, vocab, vocab_size, train_tokens, val_tokens):
    meta = {'vocab': vocab, 'vocab_size': vocab_size,
            'train_tokens': train_tokens, 'val_tokens': val_tokens}
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    print(f"vocab_size {vocab_size:,}; train has {train_tokens:,} tokens, val {val_tokens:,}; "
          f"written to {out_dir}")


def split_and_write(text, vocab, out_dir, val_fraction=0.1):
    """Encode the first (1 - val_fraction) of the text as train, the rest as val, and write both."""
    from tokenizer import Tokenizer
    tok = Tokenizer(vocab)
    cut = int(len(text) * (1 - val_fraction))
    write_dataset(out_dir, tok.encode(text[:cut]), tok.encode(text[cut:]), vocab, tok.vocab_size)


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
