r"""
How fast data/fineweb_edu/prepare.py (and data/openwebtext's) turn parquet into bins, and what
that projects to for all of FineWeb-Edu's sample-10BT: parquet read (MB/s, one process) and BPE
tokenising (tokens/s, one process), what each worker process does to a row group, and the whole
write_parquet_dataset with 1 and with --num_proc processes, interleaved --repeats times.

    python scripts/bench_prepare.py                       # tiny Shakespeare as ~5 KB documents
    python scripts/bench_prepare.py --input=data/fineweb_edu/parquet --num_proc=16   # real shards
Offline, tiktoken needs TIKTOKEN_CACHE_DIR. Nothing is kept: the bins go to a temporary folder.
"""

import glob
import os
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import cli
from nanogpt.errors import UserError
from nanogpt.prepare import (
    encode_documents,
    parquet_row_groups,
    read_documents,
    write_parquet_dataset,
)

SAMPLE_TOKENS = 10e9  # FineWeb-Edu sample-10BT: ~10B GPT-2 tokens, as its dataset card says
SAMPLE_BYTES = 28.5e9  # its 14 parquet files


@dataclass
class BenchPrepareConfig:
    # a folder of parquet files with a 'text' column; '' makes ~10 MB of them from --text
    input: str = ''
    text: str = 'data/shakespeare_char/input.txt'  # the text cut into documents when no input
    doc_chars: int = 5000  # characters per made-up document (FineWeb-Edu's average is ~5 KB)
    mb: float = 10.0  # parquet text to make, in MB of UTF-8 (the text repeated as needed)
    num_proc: int = 2  # processes for the parallel run
    repeats: int = 2  # times each measurement runs, interleaved; the best is reported
    cores: int = 16  # the machine the whole-sample time is projected to


def make_parquet(cfg, folder):
    import pyarrow as pa
    import pyarrow.parquet as pq
    if not os.path.isfile(cfg.text):
        raise UserError(f"{cfg.text} not found: run python data/shakespeare_char/prepare.py, or "
                        "give --text or --input")
    with open(cfg.text, encoding='utf-8') as f:
        text = f.read()
    text = text * int(cfg.mb * 1e6 / len(text.encode()) + 1)
    docs = [text[i:i + cfg.doc_chars] for i in range(0, int(cfg.mb * 1e6), cfg.doc_chars)]
    for k in range(2):  # two shards, as the row groups of a real one
        pq.write_table(pa.table({'text': docs[k::2]}), os.path.join(folder, f'{k:03d}.parquet'),
                       row_group_size=1000)
    return sorted(glob.glob(os.path.join(folder, '*.parquet')))


def main(cfg):
    if cfg.num_proc < 1 or cfg.repeats < 1 or cfg.cores < 1:
        raise UserError("num_proc, repeats and cores must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        files = (sorted(glob.glob(os.path.join(cfg.input, '*.parquet'))) if cfg.input
                 else make_parquet(cfg, tmp))
        if not files:
            raise UserError(f"{cfg.input} holds no .parquet files")
        n_bytes = sum(os.path.getsize(p) for p in files)
        best = {}

        def timed(name, fn):
            t0 = time.perf_counter()
            out = fn()
            best[name] = min(best.get(name, float('inf')), time.perf_counter() - t0)
            return out

        encode_documents(['warm up: load the BPE'])
        for _ in range(cfg.repeats):
            docs = timed('read', lambda: [
                d for p in files for i in range(len(parquet_row_groups(p)))
                for batch in read_documents(p, i) for d in batch])
            n_chars = sum(len(d) for d in docs)
            tokens = len(timed('encode', lambda: encode_documents(docs)))
            for n in sorted({1, cfg.num_proc}):
                timed(f'prepare {n}', lambda: write_parquet_dataset(
                    files, os.path.join(tmp, 'bins'), 10, n))
    print(f"\n{len(files)} parquet file(s), {n_bytes / 1e6:.1f} MB, {len(docs):,} documents, "
          f"{n_chars / 1e6:.1f}M characters, {tokens:,} tokens ({n_chars / tokens:.2f} chars/token)"
          f"; best of {cfg.repeats}, {os.cpu_count()} CPU(s) here")
    read_mb_s = n_bytes / 1e6 / best['read']
    encode_tok_s = tokens / best['encode']
    print(f"read (1 process): {read_mb_s:.1f} MB/s of parquet, {len(docs) / best['read']:,.0f} "
          f"documents/s")
    print(f"tokenise (1 process): {encode_tok_s:,.0f} tokens/s")
    for name in sorted(k for k in best if k.startswith('prepare')):
        print(f"{name} process(es), end to end: {tokens / best[name]:,.0f} tokens/s, "
              f"{n_bytes / 1e6 / best[name]:.1f} MB/s of parquet")
    # the whole sample: each worker reads and tokenises its row groups, all cores at once (the
    # main process only appends ids to the bins)
    hours = (SAMPLE_TOKENS / encode_tok_s + SAMPLE_BYTES / 1e6 / read_mb_s) / cfg.cores / 3600
    print(f"projected for FineWeb-Edu sample-10BT ({SAMPLE_TOKENS / 1e9:.2f}B tokens, "
          f"{SAMPLE_BYTES / 1e9:.1f} GB of parquet) on {cfg.cores} cores: {hours * 60:.0f} min")


if __name__ == '__main__':
    cli(main, BenchPrepareConfig)
