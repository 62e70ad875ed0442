"""
FineWeb-Edu's sample-10BT (Penedo et al. 2024: Common Crawl pages an LLM judged educational) in
GPT-2's BPE, to train GPT-2 124M as llm.c and build-nanogpt do (config/train_gpt2_fineweb.py).

    python data/fineweb_edu/prepare.py               # download the 14 parquet files, ~28.5 GB
    python data/fineweb_edu/prepare.py --shards=1    # only the first file (~0.7B tokens)
    python data/fineweb_edu/prepare.py --input DIR   # parquet files already on disk, offline
    HF_ENDPOINT=https://my-mirror python data/fineweb_edu/prepare.py   # through a mirror
Needs `pip install pyarrow` (the data extra); offline, tiktoken needs TIKTOKEN_CACHE_DIR.

The files come from datasets/HuggingFaceFW/fineweb-edu, folder sample/10BT (000_00000.parquet ...
013_00000.parquet), over plain HTTP: an interrupted download resumes when run again, and each file
is checked against the size and SHA-256 the Hub lists. They stay in parquet/ here (delete them
after). Each document becomes its ids then <|endoftext|>; the first 10,000 documents of the first
file are val (~10M tokens), the rest train (~10B tokens, train.bin ~20 GB).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import cli
from nanogpt.prepare import prepare_hub_parquet

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    prepare_hub_parquet(__doc__.split('\n\n')[0], HERE, repo='HuggingFaceFW/fineweb-edu',
                        revision='main', folder='sample/10BT', val_docs=10_000)


if __name__ == '__main__':
    cli(main)
