"""
Your own text as a dataset: a file, or a folder of .txt files (one document each, in name order).

    python data/text/prepare.py --input my_novel.txt  # -> data/my_novel/, characters
    python data/text/prepare.py --input letters/ --tokenizer gpt2 --name letters  # -> data/letters/
    python data/text/prepare.py --input my_novel.txt --tokenizer bpe --vocab_size 2048  # your BPE
    python train.py config/train_shakespeare_char_cpu.py --dataset=my_novel --out_dir=out-my-novel
    python sample.py --out_dir=out-my-novel

Like the Shakespeare scripts: the first 90% of the text is train, the rest val, as uint16 ids in
train.bin/val.bin with the vocabulary in meta.json. With --tokenizer char (the default) each
distinct character is a token, documents are joined by a newline; with gpt2, documents are
separated by GPT-2's <|endoftext|> token; with bpe, a byte-level BPE of --vocab_size tokens is
learned from the train split alone (nanogpt/tokenizer.py's train_bpe, which needs Hugging Face
tokenizers: pip install -e .[data]), with <|endoftext|> between documents. The vocabulary travels
in meta.json and every checkpoint: sampling, eval, serving and chat need only tiktoken.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import cli  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.prepare import read_text, split_and_write  # noqa: E402
from nanogpt.tokenizer import EOT, GPT2_VOCAB, char_vocab, train_bpe  # noqa: E402

DATA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_documents(path):
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith('.txt'))
        if not files:
            raise UserError(f"no .txt files in folder {path}")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UserError(f"input {path} not found")
    docs = []
    if len(files) > 100:
        try:
            from tqdm import tqdm
            files = tqdm(files, desc='reading', unit='file')
        except ImportError:  # the core install has no tqdm: one line instead of a bar
            print(f"reading {len(files)} files (pip install -e .[data] for a progress bar)")
    for f in files:
        text = read_text(f)
        if text.strip():
            docs.append(text)
    if not docs:
        raise UserError(f"{path} holds no text (empty file{'s' if len(files) > 1 else ''})")
    return docs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--input', required=True,
                        help='a UTF-8 text file, or a folder of .txt files')
    parser.add_argument('--tokenizer', choices=('char', 'gpt2', 'bpe'), default='char')
    parser.add_argument('--vocab_size', type=int, default=2048,
                        help='with --tokenizer bpe: the tokens to learn, 256 bytes and '
                             '<|endoftext|> included (default 2048)')
    parser.add_argument('--name', help='dataset name, i.e. data/NAME '
                                       '(default: the input file or folder name)')
    parser.add_argument('--out_dir', help='write here instead of data/NAME')
    parser.add_argument('--val_fraction', type=float, default=0.1)
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    docs = read_documents(args.input)
    name = args.name or os.path.splitext(os.path.basename(os.path.normpath(args.input)))[0]
    out_dir = args.out_dir or os.path.join(DATA, name)
    if args.tokenizer == 'char':
        text = '\n'.join(docs)
        vocab = char_vocab(text)
    else:
        # encoded as the single end-of-text token between documents
        text = EOT.join(docs)
        vocab = GPT2_VOCAB
        if args.tokenizer == 'bpe':  # learned from the train split's documents only
            vocab = lambda train: train_bpe(train.split(EOT), args.vocab_size)  # noqa: E731
    split_and_write(text, vocab, out_dir, args.val_fraction)
    print(f"train on it with --dataset={name}" + (f" --data_dir={out_dir}" if args.out_dir else ''))


if __name__ == '__main__':
    cli(main)
