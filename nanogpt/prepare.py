"""
What every data/<name>/prepare.py shares: finding the raw text (a local file, or a download that
resumes where it was cut off), and writing token ids as the headerless uint16 train.bin/val.bin
plus meta.json that train.py reads; for web-scale corpora, parquet files from the Hugging Face Hub
tokenised in parallel processes with bounded memory.
"""

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from urllib.parse import quote

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
    """(line number, object) for each non-blank line of a JSONL file, the one reader of every
    script's JSONL input; a line that is not UTF-8 or not JSON is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"input file {path} not found")
    with open(path, 'rb') as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode('utf-8')
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                                f"column {e.start + 1}): convert it, e.g. iconv -f latin1 -t "
                                "utf-8") from None
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None


def hub_url(repo, revision, path):
    """The URL of a file of a Hugging Face dataset repository. The host is HF_ENDPOINT when set
    (a mirror), as huggingface_hub takes it, else https://huggingface.co."""
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')
    return f"{endpoint}/datasets/{repo}/resolve/{quote(revision, safe='')}/{path}"


def download(url, path, hint='--input FILE', sha256=None):
    """url's bytes to path, showing the MB received. They arrive in path + '.partial', which an
    interrupted download leaves behind and the next call resumes (an HTTP Range request for the
    bytes after it); path appears, renamed in one step, only once all have arrived (and, given
    sha256, hash to it: a corrupt download is deleted)."""
    import requests
    partial = path + '.partial'
    done = os.path.getsize(partial) if os.path.isfile(partial) else 0
    print(f"downloading {url} to {path}"
          + (f" (resuming after {done / 1e6:.1f} MB)" if done else ''))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with requests.get(url, timeout=60, stream=True,
                          headers={'Range': f'bytes={done}-'} if done else {}) as response:
            if response.status_code == 416:  # nothing after the partial file: start again
                os.remove(partial)
                return download(url, path, hint, sha256)
            if response.status_code != 206:  # a whole file: a server that ignores Range too
                response.raise_for_status()
                done = 0
            # the file's size: Content-Range says it for a range ("bytes 100-199/200")
            total = response.headers.get('content-range', '').rpartition('/')[2]
            total = int(total) if total.isdigit() else (
                done + int(response.headers.get('content-length', 0)) or None)
            with open(partial, 'ab' if done else 'wb') as f:
                # 64 KiB reads: what a dropped connection loses of the last one, to fetch again;
                # the progress line is redrawn once a MB, not once a read (a 2 GB file: 30k reads)
                for chunk in response.iter_content(2**16):
                    f.write(chunk)
                    done += len(chunk)
                    if done % 2**20 < len(chunk) or done == total:
                        print(f"\r{done / 1e6:.1f} MB"
                              + (f" of {total / 1e6:.1f} MB" if total else ''), end='', flush=True)
            print()
    except requests.RequestException as e:
        print()
        kept = (f"run the same command again to resume from {done / 1e6:.1f} MB, "
                if os.path.isfile(partial) else '')
        raise UserError(f"could not download {url} ({type(e).__name__}): {kept}download it by "
                        f"hand to {path}, or pass {hint}") from None
    if total is not None and done != total:
        raise UserError(f"{url} ended after {done:,} of {total:,} bytes: run the same command "
                        "again to resume")
    if sha256 and file_sha256(partial) != sha256:
        os.remove(partial)
        raise UserError(f"{url} arrived corrupt (its SHA-256 is not the {sha256[:12]}... the "
                        "server lists): run the same command again to download it anew")
    os.replace(partial, path)  # never leave a half-written file where the next run would trust it


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


def finish_dataset(out_dir, vocab, vocab_size, masked=False, source=None):
    """Move train.bin.tmp and val.bin.tmp (and with masked, train_mask.bin.tmp and
    val_mask.bin.tmp) into place with a meta.json that records what they hold: the vocabulary, and
    per split its tokens, bytes, largest id and SHA-256 (and its mask's); and `source`, a dict
    saying where the text came from, if given. meta.json moves last,
    so that until a prepare run has finished, the dataset in out_dir is the old one, or a mix that
    dataset.open_dataset refuses (its bins disagree with the meta.json beside them)."""
    meta = {'vocab': vocab, 'vocab_size': vocab_size, **({'source': source} if source else {})}
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


# --------------------------------------------------------------------------------------------------
# Web-scale corpora as parquet files (data/fineweb_edu, data/openwebtext), read with pyarrow and
# tokenised with GPT-2's BPE in parallel processes, as nanochat and llm.c prepare theirs.

def hub_parquet_files(repo, revision, folder):
    """(path, bytes, SHA-256) of each parquet file in `folder` of a Hugging Face dataset repository,
    in name order, from the Hub's tree API (the listing huggingface_hub's list_repo_tree reads)."""
    import requests
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')
    url = f"{endpoint}/api/datasets/{repo}/tree/{quote(revision, safe='')}/{folder}"
    try:
        response = requests.get(url, timeout=60)
        response.raise_for_status()
        entries = response.json()
    except (requests.RequestException, ValueError) as e:
        raise UserError(f"could not list {repo}'s files at {url} ({type(e).__name__}): set "
                        "HF_ENDPOINT to a mirror, or download the parquet files by other means "
                        "and pass --input DIR") from None
    files = sorted((e['path'], e['size'], e.get('lfs', {}).get('oid')) for e in entries
                   if e.get('type') == 'file' and e['path'].endswith('.parquet'))
    if not files:
        raise UserError(f"{url} lists no parquet files")
    return files


def parquet_row_groups(path, column='text'):
    """The number of rows of each row group of a parquet file with a `column`, from its footer;
    a file pyarrow cannot read is a UserError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise unreadable(path, e) from None
    if column not in meta.schema.names:
        raise UserError(f"{path} has no '{column}' column (it has {', '.join(meta.schema.names)})")
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def unreadable(path, e):
    first_line = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return UserError(f"{path} is not a readable parquet file ({first_line}): delete it, and run "
                     "again to download it anew")


def read_documents(path, row_group, column='text', batch_rows=1024):
    """The documents of one row group of a parquet file, batch_rows at a time (lists of str);
    null documents are skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_rows, row_groups=[row_group], columns=[column]):
            yield [text for text in batch.column(0).to_pylist() if text is not None]
    except (pa.ArrowException, OSError) as e:
        raise unreadable(path, e) from None


_encoding = None  # GPT-2's BPE, loaded once per worker process


def encode_documents(texts):
    """GPT-2 BPE ids of each document, each followed by <|endoftext|> (50256), concatenated as
    uint16. encode_ordinary: a literal "<|endoftext|>" inside a web page is text, not a document
    boundary."""
    global _encoding
    if _encoding is None:
        from nanogpt.tokenizer import GPT2_VOCAB, Tokenizer
        _encoding = Tokenizer(GPT2_VOCAB).enc
    ids = []
    for text in texts:
        ids += _encoding.encode_ordinary(text)
        ids.append(_encoding.eot_token)
    return np.array(ids, dtype=np.uint16)


def encode_row_group(path, row_group, n_val, column):
    """What one worker process does: read a row group and encode its documents; the ids of its
    first n_val rows (val) and of the others (train), and how many documents each held."""
    val, train = [], []
    for texts in read_documents(path, row_group, column):
        take = min(n_val, len(texts))
        n_val -= take
        val += texts[:take]
        train += texts[take:]
    return encode_documents(val), encode_documents(train), len(val), len(train)


def write_parquet_dataset(files, out_dir, val_docs, num_proc, column='text', source=None):
    """train.bin, val.bin and meta.json from the documents of parquet `files`, each row group
    read and tokenised by one of num_proc worker processes (so the main process only writes, and
    the work scales with the cores). The first val_docs rows (of the first file, in file order:
    the same on every machine) are val, all the others train. Memory stays bounded whatever the
    files' sizes: at most 2 * num_proc row groups are in flight, and their ids are appended to the
    bins as they come back, in order."""
    from nanogpt.tokenizer import GPT2_VOCAB, Tokenizer
    vocab_size = Tokenizer(GPT2_VOCAB).vocab_size  # fails here, in one line, without the BPE file
    os.makedirs(out_dir, exist_ok=True)
    tasks, seen = [], 0  # (file, row group, how many of its first rows are val)
    for path in files:
        for i, rows in enumerate(parquet_row_groups(path, column)):
            tasks.append((path, i, max(0, min(rows, val_docs - seen)), column))
            seen += rows
    n_bytes = sum(os.path.getsize(p) for p in files)
    tokens, docs = {'train': 0, 'val': 0}, {'train': 0, 'val': 0}
    t0 = time.perf_counter()
    bins = {s: open(os.path.join(out_dir, f'{s}.bin.tmp'), 'wb') for s in ('train', 'val')}
    try:
        with multiprocessing.Pool(num_proc) as pool:
            pending = deque()  # row groups on their way, in corpus order

            def write_oldest():
                val, train, n_val, n_train = pending.popleft().get()
                for split, ids, n in (('val', val, n_val), ('train', train, n_train)):
                    ids.tofile(bins[split])
                    tokens[split] += len(ids)
                    docs[split] += n
                if sum(docs.values()) % 100_000 < n_val + n_train:  # about every 100k
                    print(f"{sum(docs.values()):,} documents, {sum(tokens.values()):,} tokens, "
                          f"{sum(tokens.values()) / (time.perf_counter() - t0):,.0f} tokens/s",
                          flush=True)

            for task in tasks:
                pending.append(pool.apply_async(encode_row_group, task))
                if len(pending) >= 2 * num_proc:
                    write_oldest()
            while pending:
                write_oldest()
    finally:
        for f in bins.values():
            f.close()
    dt = time.perf_counter() - t0
    print(f"{sum(docs.values()):,} documents ({docs['val']:,} in val), "
          f"{sum(tokens.values()):,} tokens from {len(files)} file(s), {n_bytes / 1e6:,.1f} MB of "
          f"parquet, in {dt:.1f} s with {num_proc} process(es): "
          f"{sum(tokens.values()) / dt:,.0f} tokens/s, {n_bytes / 1e6 / dt:.1f} MB/s")
    source = {**(source or {}), 'files': [os.path.basename(p) for p in files],
              'documents': docs}
    finish_dataset(out_dir, GPT2_VOCAB, vocab_size, source=source)
    return sum(docs.values())


def prepare_hub_parquet(description, here, repo, revision, folder, val_docs, expected_docs=None):
    """The main of a corpus of parquet files in a folder of a Hugging Face dataset repository:
    --input DIR (parquet files already on disk), else the first --shards files downloaded into
    --download_dir (resumed if interrupted, checked against the Hub's size and SHA-256), then
    write_parquet_dataset into --out_dir. expected_docs: the whole corpus's document count, to say
    when a run saw fewer."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--input', help='a folder of parquet files already on disk, read in name '
                                        'order (default: download them)')
    parser.add_argument('--shards', type=int, help='download and read only the first K files')
    parser.add_argument('--download_dir', default=os.path.join(here, 'parquet'),
                        help='where the downloaded files go (default: parquet/ here)')
    parser.add_argument('--out_dir', default=here, help='where to write the bins (default: here)')
    parser.add_argument('--num_proc', type=int, default=os.cpu_count(),
                        help='tokenising processes (default: one per CPU)')
    parser.add_argument('--val_docs', type=int, default=val_docs,
                        help=f'documents held out as val, from the start (default: {val_docs:,})')
    args = parser.parse_args()
    if args.num_proc < 1 or args.val_docs < 1 or (args.shards is not None and args.shards < 1):
        raise UserError("--num_proc, --val_docs and --shards must be at least 1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("the parquet files are read with pyarrow: pip install pyarrow "
                        "(or pip install -e .[data])") from None
    if args.input:
        files = sorted(glob.glob(os.path.join(args.input, '*.parquet')))[:args.shards]
        if not files:
            raise UserError(f"--input {args.input} holds no .parquet files")
        source = {'input': os.path.abspath(args.input)}
    else:
        listed = hub_parquet_files(repo, revision, folder)[:args.shards]
        files = []
        for path, size, sha256 in listed:
            dest = os.path.join(args.download_dir, os.path.relpath(path, folder))
            if not os.path.isfile(dest):  # a file there is whole: download() renames only then
                download(hub_url(repo, revision, path), dest, '--input DIR', sha256)
            files.append(dest)
        source = {'repo': repo, 'revision': revision, 'folder': folder}
    seen = write_parquet_dataset(files, args.out_dir, args.val_docs, args.num_proc, source=source)
    if expected_docs and seen != expected_docs and args.shards is None and args.input is None:
        print(f"note: the corpus has {expected_docs:,} documents; these files held {seen:,}")
