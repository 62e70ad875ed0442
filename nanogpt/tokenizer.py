"""
Vocabularies: one place that turns a vocabulary spec into encode/decode.

A spec is a small JSON-able dict, stored in a dataset's meta.json and in every checkpoint, so a
model can be sampled without the data folder it was trained on:
    {"kind": "char", "chars": "\n !$&',-.3:;?ABC..."}   one id per character, in this order
    {"kind": "tiktoken", "encoding": "r50k_base"}       a BPE from tiktoken (r50k_base is GPT-2's)
    {"kind": "bpe", "pattern": SPLIT_PATTERN, "merges": [[a, b], ...]}   a byte-level BPE trained on
        your text (train_bpe): ids 0..255 are the bytes, id 256 + k is tokens a and b joined by
        merge k, and the id after the last merge is <|endoftext|>. Encoding and decoding need only
        tiktoken (a core dependency); training needs Hugging Face tokenizers (the data extra).
Either may add "special": ["<|user|>", ...]: tokens that no text encodes to, given the ids after the
base vocabulary's (for GPT-2's BPE 50257.., inside the rows a padded model already has, so no
existing token changes meaning). chat_format.py uses them to mark a conversation's turns.
"""

import itertools
import json
import os
import re

from nanogpt.errors import UserError

GPT2_VOCAB = {'kind': 'tiktoken', 'encoding': 'r50k_base'}  # OpenAI's GPT-2 BPE, byte for byte
# How a BPE of ours cuts text into pieces before merging bytes (merges never cross pieces): GPT-4's
# (tiktoken's cl100k_base, also Llama 3's). Words keep the space before them (" the" is one token)
# and contractions split off in any case ('S as 's: tiny Shakespeare is full of upper case), so the
# vocabulary is not spent on "the," "the." "the\n" variants; digits go in runs of at most 3,
# punctuation runs apart from letters, newlines (with the spaces before them) on their own.
# GPT-2's pattern differs mainly in matching contractions in lower case only and in splitting
# runs of spaces and newlines differently.
SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
EOT = '<|endoftext|>'  # between documents, in every BPE here
# where a long text may be cut into parts that encode to the ids of the whole: a newline between
# two non-space characters ends a piece of GPT-2's and GPT-4's patterns both (see encode_corpus)
CUT = re.compile(r'(?<=\S)\n(?=\S)')


def bytes_to_unicode():
    """GPT-2's printable stand-in for each byte (from OpenAI's encoder.py), which Hugging Face's
    byte-level BPE uses too: their vocabularies are text, so each byte of a token is written as one
    visible character. Printable Latin-1 bytes stand for themselves; the other 68 map to code
    points 256 and up, in order."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) \
        + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def char_vocab(text):
    """The character-level spec of a text: its distinct characters, sorted by code point."""
    return {'kind': 'char', 'chars': ''.join(sorted(set(text)))}


def train_bpe(texts, vocab_size, min_frequency=2):
    """The spec of a byte-level BPE of vocab_size tokens (256 bytes, vocab_size - 257 merges and
    <|endoftext|>) learned from texts, a list of documents, by Hugging Face tokenizers' trainer:
    pieces cut by SPLIT_PATTERN, then the most frequent adjacent pair merged into a new token, again
    and again. Any text encodes (every byte is a token: no unknown token) and decodes back exactly.
    A pair seen fewer than min_frequency times is never merged: a corpus supports so many tokens."""
    try:
        from tokenizers import Regex, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise UserError("training a BPE needs Hugging Face tokenizers: pip install -e .[data] "
                        "(or pip install tokenizers)") from None
    if vocab_size < 258:
        raise UserError(f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs "
                        f"256 byte tokens, {EOT} and at least one merge (--vocab_size=258 or more)")
    if vocab_size > 2**16:
        raise UserError(f"vocab_size {vocab_size} does not fit uint16 token ids "
                        f"(--vocab_size={2**16} or less)")
    if not any(t.strip() for t in texts):
        raise UserError("the input text is empty: nothing to learn a BPE from")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([  # as tiktoken does: cut pieces, then bytes
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer, length=len(texts))
    # Hugging Face numbers the 256 bytes in the order of their stand-in characters and may list
    # one token under two merges (("a", "bc") after ("ab", "c")); ours are ranks as tiktoken reads
    # them: byte b is id b, then each new token with the first merge that made it, in the order made
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = hf.get_vocab()
    rank = {c: byte_of[c] for c in byte_of}
    merges = []
    for a, b in json.loads(hf.to_str())['model']['merges']:
        if a + b not in rank:
            rank[a + b] = 256 + len(merges)
            merges.append([rank[a], rank[b]])
    assert len(rank) == len(vocab), "every token of the trained vocabulary has its merge"
    if len(merges) < vocab_size - 257:
        raise UserError(f"the text supports only {len(merges) + 257} tokens (pairs seen at least "
                        f"{min_frequency} times): use --vocab_size={len(merges) + 257} or less, "
                        "or give more text")
    return {'kind': 'bpe', 'pattern': SPLIT_PATTERN, 'merges': merges}


class Tokenizer:

    def __init__(self, spec):
        self.spec = spec
        if spec['kind'] == 'char':
            self.chars = spec['chars']
            self.stoi = {ch: i for i, ch in enumerate(self.chars)}
            self.vocab_size = len(self.chars)
            self.eot_token = None
        elif spec['kind'] == 'tiktoken':
            import tiktoken
            try:
                self.enc = tiktoken.get_encoding(spec['encoding'])
            except Exception as e:  # offline with no cache: tiktoken raises a requests error
                raise UserError(f"cannot load the '{spec['encoding']}' BPE ({type(e).__name__}); "
                                "with no network, point TIKTOKEN_CACHE_DIR at a folder "
                                "holding its cached file") from None
            self.vocab_size = self.enc.n_vocab
            self.eot_token = self.enc.eot_token
        elif spec['kind'] == 'bpe':
            import tiktoken
            tokens = [bytes([b]) for b in range(256)]
            try:
                for a, b in spec['merges']:
                    if not 0 <= min(a, b) <= max(a, b) < len(tokens):
                        raise ValueError(f"merge {len(tokens) - 256} joins tokens not made yet")
                    tokens.append(tokens[a] + tokens[b])
                ranks = {t: i for i, t in enumerate(tokens)}
                if len(ranks) < len(tokens):
                    raise ValueError("two merges make the same token")
                # tiktoken encodes with any byte-level BPE given its ranks, as nanochat does
                self.enc = tiktoken.Encoding('bpe', pat_str=spec['pattern'],
                                             mergeable_ranks=ranks,
                                             special_tokens={EOT: len(tokens)})
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"the BPE vocabulary is malformed ({type(e).__name__}: {e}): "
                                "prepare the data again, or use another checkpoint") from None
            self.vocab_size = self.enc.n_vocab
            self.eot_token = self.enc.eot_token
        else:
            raise UserError(f"unknown vocabulary kind {spec['kind']!r} "
                            "(expected 'char', 'tiktoken' or 'bpe')")
        # special token -> id, after the base vocabulary; decode writes them out by name
        self.special = {s: self.vocab_size + i for i, s in enumerate(spec.get('special', ()))}
        self.special_names = {i: s for s, i in self.special.items()}
        self.vocab_size += len(self.special)

    def encode(self, text, allow_special=True):
        """Token ids of text. Text never encodes to the spec's special tokens; allow_special=False
        also keeps a BPE's <|endoftext|> as plain text (for what a user typed)."""
        if self.spec['kind'] == 'char':
            unknown = sorted(set(text) - self.stoi.keys())
            if unknown:
                raise UserError(f"characters not in the model's vocabulary: {''.join(unknown)!r} "
                                "(use only characters the model was trained on)")
            return [self.stoi[c] for c in text]
        if not allow_special:
            return self.enc.encode_ordinary(text)
        return self.enc.encode(text, allowed_special={EOT})

    def encode_corpus(self, text, threads=None):
        """encode(text) for a whole corpus, on all cores: a BPE's text is cut into parts of about
        256k characters where no piece of the split pattern crosses (CUT), which tiktoken encodes
        in parallel threads."""
        if self.spec['kind'] == 'char':
            return self.encode(text)
        parts, start = [], 0
        while start < len(text):
            cut = CUT.search(text, start + 2**18)
            end = cut.end() if cut else len(text)
            parts.append(text[start:end])
            start = end
        threads = threads or os.cpu_count()
        ids = self.enc.encode_batch(parts, num_threads=threads, allowed_special={EOT})
        return list(itertools.chain.from_iterable(ids))

    def decode(self, ids):
        if not self.special:
            return self._decode(ids)
        text, run = [], []  # runs of ordinary ids, decoded together (a BPE character may span ids)
        for i in ids:
            if i in self.special_names:
                text += [self._decode(run), self.special_names[i]]
                run = []
            else:
                run.append(i)
        return ''.join(text) + self._decode(run)

    def _decode(self, ids):
        if self.spec['kind'] == 'char':
            return ''.join(self.chars[i] for i in ids)
        return self.enc.decode(list(ids))

    def text_sizes(self):
        """The UTF-8 bytes and the characters of text that each token id stands for: two lists
        indexed by id. Summed over a token sequence they give the exact size of its text, even where
        a BPE token holds only part of a multi-byte character: a character is counted in the token
        holding its first byte (every UTF-8 byte but a continuation byte 0b10xxxxxx starts a
        character).
        Special tokens such as <|endoftext|> separate documents and stand for no text: 0 and 0."""
        n_special = [0] * len(self.special)
        if self.spec['kind'] == 'char':
            return ([len(c.encode('utf-8')) for c in self.chars] + n_special,
                    [1] * len(self.chars) + n_special)
        special = {self.enc.encode_single_token(s) for s in self.enc.special_tokens_set}
        special |= self.special_names.keys()
        n_bytes, n_chars = [], []
        for i in range(self.vocab_size):
            b = b'' if i in special else self.enc.decode_single_token_bytes(i)
            n_bytes.append(len(b))
            n_chars.append(sum((byte & 0xC0) != 0x80 for byte in b))
        return n_bytes, n_chars


def padded_vocab_size(vocab_size, multiple=64):
    """The embedding rows of a model trained from scratch: a BPE vocabulary rounded up to a
    multiple of 64 (GPT-2's 50,257 to 50,304), as matmuls whose sizes divide by 64 run faster on
    GPUs (nanoGPT measured ~25%). The extra rows are never a target, so training pushes their
    logits down, and checkpoint.load_model cuts them off. A character vocabulary (at most a few
    hundred tokens) stays as it is: its head is a small part of the work, and padding would only
    change its numbers."""
    return vocab_size if vocab_size <= 1024 else -(-vocab_size // multiple) * multiple
