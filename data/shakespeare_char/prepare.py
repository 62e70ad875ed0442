"""
Tiny Shakespeare at character level: each of its 65 distinct characters is one token.

    python data/shakespeare_char/prepare.py                # uses or downloads input.txt here
    python data/shakespeare_char/prepare.py --input FILE   # any local copy, offline
    python data/shakespeare_char/prepare.py --out_dir DIR  # write the bins elsewhere

Writes train.bin (first 90% of the text) and val.bin (last 10%), uint16 ids, and meta.json with the
vocabulary. Real corpus: 1,115,394 characters -> train 1,003,854 tokens, val 111,540.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import cli  # noqa: E402
from nanogpt.prepare import prepare_text_dataset  # noqa: E402
from nanogpt.tokenizer import char_vocab  # noqa: E402

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def main():
    prepare_text_dataset(__doc__.splitlines()[1], os.path.dirname(os.path.abspath(__file__)), URL,
                         char_vocab)


if __name__ == '__main__':
    cli(main)
