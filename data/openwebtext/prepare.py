"""
OpenWebText (Gokaslan & Cohen 2019, an open re-creation of GPT-2's WebText) in GPT-2's BPE,
to reproduce GPT-2.

    python data/openwebtext/prepare.py                  # download through Hugging Face datasets
    python data/openwebtext/prepare.py --num_proc=16    # tokenise with 16 processes
    python data/openwebtext/prepare.py --input DIR      # a local corpus, offline: a folder of .txt
                                                        # files (one document each) or a dataset
                                                        # saved with datasets' save_to_disk
Needs `pip install datasets tqdm`; offline, tiktoken needs TIKTOKEN_CACHE_DIR (see the README).

Each document becomes its token ids followed by <|endoftext|> (50256), so the model sees where one
text ends and the next begins. A random 0.05% of the documents (seed 2357) is held out as val. The
bins are written through a memmap in batches of documents, so memory stays bounded whatever the
corpus size.

The real corpus (the reference's figures, not measured here): 8,013,769 documents, ~54 GB in the
Hugging Face cache; train.bin ~17 GB (~9.0B tokens), val.bin ~8.5 MB (~4.4M tokens).
"""

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import cli  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.prepare import finish_dataset  # noqa: E402
from nanogpt.tokenizer import GPT2_VOCAB, Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HF_NAME = 'Skylion007/openwebtext'


def load_corpus(path, num_proc):
    """A datasets.Dataset with one document per row, in a 'text' column."""
    from datasets import DatasetDict, load_dataset, load_from_disk
    if path is None:
        try:
            return load_dataset(HF_NAME, split='train', num_proc=num_proc)
        except Exception as e:  # network, disk, or a datasets version that cannot read the hub copy
            raise UserError(f"could not load {HF_NAME} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                            "get a copy by other means and pass --input DIR") from None
    if not os.path.isdir(path):
        raise UserError(f"--input {path} is not a folder "
                        "(expected .txt files or a dataset saved with save_to_disk)")
    if any(os.path.isfile(os.path.join(path, f))
           for f in ('dataset_info.json', 'dataset_dict.json')):
        ds = load_from_disk(path)
        ds = ds['train'] if isinstance(ds, DatasetDict) else ds
        if 'text' not in ds.column_names:
            raise UserError(f"the dataset in {path} has no 'text' column "
                            f"(it has {', '.join(ds.column_names)})")
        return ds
    files = sorted(glob.glob(os.path.join(path, '*.txt')))
    if len(files) < 2:
        raise UserError(f"{path} holds {len(files)} .txt files: "
                        "need at least 2 documents (one for val)")
    return load_dataset('text', data_files=files, sample_by='document', split='train')


def tokenize(batch):
    """Token ids of each document of a batch, then <|endoftext|>.
    Runs in the num_proc worker processes."""
    # cheap after the first call: tiktoken keeps the encoding per process
    tok = Tokenizer(GPT2_VOCAB)
    # encode_ordinary: a literal "<|endoftext|>" inside a web page is text, not a document boundary
    ids = [tok.enc.encode_ordinary(text) + [tok.eot_token] for text in batch['text']]
    return {'ids': ids, 'len': [len(x) for x in ids]}


def write_bin(dset, path):
    """Concatenate the documents' ids into path + '.tmp' (finish_dataset moves it into place),
    ~1/1024 of the split in memory at a time."""
    from tqdm import tqdm
    n_tokens = int(np.sum(dset['len'], dtype=np.uint64))
    tmp = path + '.tmp'
    arr = np.memmap(tmp, dtype=np.uint16, mode='w+', shape=(n_tokens,))
    n_batches = min(1024, len(dset))
    idx = 0
    for i in tqdm(range(n_batches), desc=f'writing {path}'):
        batch = dset.shard(num_shards=n_batches, index=i, contiguous=True).with_format('numpy')
        ids = np.concatenate(batch['ids'])
        arr[idx:idx + len(ids)] = ids
        idx += len(ids)
    arr.flush()
    del arr


def main():
    # the docstring's first paragraph: the summary, over two lines that argparse joins
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--input',
                        help='local corpus folder (default: download OpenWebText from the hub)')
    parser.add_argument('--out_dir', default=HERE,
                        help='where to write the bins (default: this folder)')
    parser.add_argument('--num_proc', type=int, default=min(8, os.cpu_count()),
                        help='tokenising processes')
    parser.add_argument('--val_fraction', type=float, default=0.0005,
                        help='share of documents held out')
    args = parser.parse_args()
    try:
        import datasets  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError:
        raise UserError("OpenWebText is read through Hugging Face datasets: "
                        "pip install datasets tqdm") from None
    tok = Tokenizer(GPT2_VOCAB)  # fails here, in one line, if the BPE file cannot be had
    corpus = load_corpus(args.input, args.num_proc)
    split = corpus.train_test_split(test_size=args.val_fraction, seed=2357, shuffle=True)
    tokenized = split.map(tokenize, batched=True, remove_columns=corpus.column_names,
                          num_proc=args.num_proc, desc='tokenizing')
    os.makedirs(args.out_dir, exist_ok=True)
    for name, key in (('train', 'train'), ('val', 'test')):
        write_bin(tokenized[key], os.path.join(args.out_dir, f'{name}.bin'))
    finish_dataset(args.out_dir, GPT2_VOCAB, tok.vocab_size)  # moves the bins into place


if __name__ == '__main__':
    cli(main)
