"""
Tiny Shakespeare in a byte-level BPE of its own, learned from its train split (2048 tokens).

    python data/shakespeare_bpe/prepare.py                     # uses or downloads input.txt here
    python data/shakespeare_bpe/prepare.py --vocab_size 8192   # a larger vocabulary
    python data/shakespeare_bpe/prepare.py --input FILE --out_dir DIR  # any local copy, offline

Writes train.bin (first 90% of the text, the only part the BPE learns from) and val.bin (last 10%),
uint16 ids, and meta.json with the vocabulary (its merges). Training the BPE needs Hugging Face
tokenizers (pip install -e .[data]); everything that reads the data or a checkpoint needs only
tiktoken. Real corpus, 2048 tokens: 1,115,394 bytes -> train 317,845 tokens, val 39,698.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import cli  # noqa: E402
from nanogpt.prepare import read_text, split_and_write  # noqa: E402
from nanogpt.tokenizer import train_bpe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--input',
                        help='local text file (default: input.txt here, downloaded if missing)')
    parser.add_argument('--out_dir', default=HERE,
                        help='where to write the bins (default: this folder)')
    parser.add_argument('--vocab_size', type=int, default=2048,
                        help='tokens in the BPE, its 256 bytes and <|endoftext|> included')
    args = parser.parse_args()
    text = read_text(args.input, URL, os.path.join(HERE, 'input.txt'))
    # split by characters, as for shakespeare_char, so all the Shakespeare datasets hold out the
    # same text
    split_and_write(text, lambda train: train_bpe([train], args.vocab_size), args.out_dir)


if __name__ == '__main__':
    cli(main)
