"""
OpenWebText (Gokaslan & Cohen 2019, an open re-creation of GPT-2's WebText) in GPT-2's BPE,
to reproduce GPT-2 as nanoGPT does (config/train_gpt2.py).

    python data/openwebtext/prepare.py                 # download the parquet files
    python data/openwebtext/prepare.py --shards=2      # only the first 2 files
    python data/openwebtext/prepare.py --input DIR     # parquet files already on disk, offline
    HF_ENDPOINT=https://my-mirror python data/openwebtext/prepare.py   # through a mirror
Needs `pip install pyarrow` (the data extra); offline, tiktoken needs TIKTOKEN_CACHE_DIR.

Skylion007/openwebtext is a script dataset, which `datasets` 4 and later refuse to run; this reads
the Hub's own parquet conversion of it instead (revision refs/convert/parquet, folder
plain_text/train), over plain HTTP, with no `datasets` at all: an interrupted download resumes
when run again, and each file is checked against the size and SHA-256 the Hub lists. They stay in
parquet/ here (delete them after). Each document becomes its ids then <|endoftext|>; the first
4,000 documents are val (~4.4M tokens, as many as nanoGPT's random 0.05%), the rest train.

The whole corpus (the reference's figures, not measured here): 8,013,769 documents; train.bin
~17 GB (~9.0B tokens).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import cli
from nanogpt.prepare import prepare_hub_parquet

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    prepare_hub_parquet(__doc__.split('\n\n')[0], HERE, repo='Skylion007/openwebtext',
                        revision='refs/convert/parquet', folder='plain_text/train',
                        val_docs=4_000, expected_docs=8_013_769)


if __name__ == '__main__':
    cli(main)
