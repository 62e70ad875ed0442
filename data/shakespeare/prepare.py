"""
Tiny Shakespeare in GPT-2's BPE (tiktoken's r50k_base): ~3.3 characters per token,
for finetuning GPT-2.

    python data/shakespeare/prepare.py                # uses or downloads input.txt beside this file
    python data/shakespeare/prepare.py --input FILE   # any local copy, offline
    python data/shakespeare/prepare.py --out_dir DIR  # write the bins elsewhere

Writes train.bin (first 90% of the text) and val.bin (last 10%), uint16 ids, and meta.json with the
vocabulary spec. Real corpus: 1,115,394 characters -> train 301,966 tokens, val 36,059.
Offline, tiktoken needs its cached BPE file: TIKTOKEN_CACHE_DIR=../shared/data/tiktoken.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import cli  # noqa: E402
from nanogpt.prepare import prepare_text_dataset  # noqa: E402
from nanogpt.tokenizer import GPT2_VOCAB  # noqa: E402

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def main():
    # split by characters, as for shakespeare_char, so both datasets hold out the same text
    # the docstring's first paragraph: the summary, over two lines that argparse joins
    prepare_text_dataset(__doc__.split('\n\n')[0], os.path.dirname(os.path.abspath(__file__)), URL,
                         lambda text: GPT2_VOCAB)


if __name__ == '__main__':
    cli(main)
