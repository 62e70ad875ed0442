"""
Conversations for supervised finetuning (SFT): a JSONL file of conversations in, token bins and the
mask of the assistant's tokens out, in the chat format of chat_format.py.

    python data/chat/prepare.py                         # downloads databricks-dolly-15k (~13 MB)
    python data/chat/prepare.py --input dolly.jsonl     # a local copy of it, offline
    python data/chat/prepare.py --input my_chats.jsonl --out_dir data/my_chats
    python data/chat/prepare.py --input my_chats.jsonl --vocab_of out-shakespeare-char-cpu \
        --out_dir data/my_chats_char                    # in the vocabulary of a model trained here

Each line of the input is one conversation, in the format OpenAI's API and most chat datasets use:
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
or one of databricks-dolly-15k (https://huggingface.co/datasets/databricks/databricks-dolly-15k,
CC BY-SA 3.0, about 15,000 human-written instructions), which becomes a user message (the
instruction, then a blank line and the context when there is one) and the assistant's response:
    {"instruction": "...", "context": "...", "response": "...", "category": "..."}

The vocabulary is GPT-2's BPE plus the four chat tokens (ids 50257..50260), or with --vocab_of that
of a dataset folder, run folder or checkpoint file plus the chat tokens after its ids.

Writes train.bin/val.bin (uint16 ids), train_mask.bin/val_mask.bin (uint8: 1 for the assistant's
tokens, the ones SFT learns) and meta.json. The last --val_fraction of the conversations (at least
one) are val. Packing: the conversations are rendered one after another, each ending with its last
<|end|>, with no padding; training reads windows of block_size tokens at random offsets as it does
for text, so a window may start inside a conversation or span two (see docs/chat.md).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import cli  # noqa: E402
from nanogpt.chat_format import chat_vocab, check_training_conversation, render  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.prepare import download, read_jsonl, write_dataset  # noqa: E402
from nanogpt.tokenizer import GPT2_VOCAB, Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
URL = ('https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/'
       'databricks-dolly-15k.jsonl')


def base_vocab(path):
    """The vocabulary spec a dataset folder (its meta.json), a run folder (its best.pt) or a
    checkpoint file holds."""
    meta = os.path.join(path, 'meta.json')
    if os.path.isfile(meta):
        with open(meta) as f:
            return json.load(f)['vocab']
    from nanogpt.checkpoint import load_checkpoint  # torch, only for this
    return load_checkpoint(os.path.join(path, 'best.pt') if os.path.isdir(path) else path)['vocab']


def messages_of(record):
    """The messages of one JSONL record: its own, or a dolly record's as user + assistant."""
    if isinstance(record, dict) and 'messages' in record:
        return record['messages']
    if isinstance(record, dict) and {'instruction', 'response'} <= record.keys():
        context = record.get('context') or ''
        user = record['instruction'] + (f"\n\n{context}" if context else '')
        return [{'role': 'user', 'content': user},
                {'role': 'assistant', 'content': record['response']}]
    raise UserError("expected an object with 'messages' (or dolly's 'instruction' and 'response')")


def read_conversations(path, tokenizer):
    """Every conversation of the JSONL file at path, rendered: a list of (ids, mask). A line that
    is not one is a UserError naming it."""
    conversations = []
    for n, record in read_jsonl(path):
        try:
            messages = messages_of(record)
            check_training_conversation(messages)
            ids, mask = render(tokenizer, messages)
        except UserError as e:
            raise UserError(f"{path}:{n}: {e}") from None
        conversations.append((ids, mask))
        if len(conversations) % 1000 == 0:
            print(f"\r{len(conversations):,} conversations", end='', flush=True)
    print(f"\r{len(conversations):,} conversations read from {path}")
    if not conversations:
        raise UserError(f"{path} holds no conversations")
    return conversations


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--input', help='a JSONL file of conversations (default: '
                        'databricks-dolly-15k.jsonl here, downloaded if missing)')
    parser.add_argument('--vocab_of', help="a dataset folder, run folder or checkpoint whose "
                        "vocabulary to add the chat tokens to (default: GPT-2's BPE)")
    parser.add_argument('--out_dir', default=HERE, help='where to write (default: this folder)')
    parser.add_argument('--val_fraction', type=float, default=0.1)
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    path = args.input
    if path is None:
        path = os.path.join(HERE, 'databricks-dolly-15k.jsonl')
        if not os.path.isfile(path):
            download(URL, path)
    elif not os.path.isfile(path):
        raise UserError(f"input file {path} not found")
    vocab = chat_vocab(base_vocab(args.vocab_of) if args.vocab_of else GPT2_VOCAB)
    tokenizer = Tokenizer(vocab)
    conversations = read_conversations(path, tokenizer)
    if len(conversations) < 2:
        raise UserError(f"{path} holds one conversation: give at least two (train and val)")
    n_val = max(1, round(len(conversations) * args.val_fraction))
    splits = conversations[:-n_val], conversations[-n_val:]
    ids = [[t for c in split for t in c[0]] for split in splits]
    masks = [[m for c in split for m in c[1]] for split in splits]
    write_dataset(args.out_dir, *ids, vocab, tokenizer.vocab_size, masks)
    print(f"{len(splits[0]):,} conversations in train, {len(splits[1]):,} in val; the "
          f"assistant's tokens: {sum(masks[0]):,} and {sum(masks[1]):,}")


if __name__ == '__main__':
    cli(main)
