"""
Vocabularies: one place that turns a vocabulary spec into encode/decode.

A spec is a small JSON-able dict, stored in a dataset's meta.json and in every checkpoint, so a
model can be sampled without the data folder it was trained on:
    {"kind": "char", "chars": "\n !$&',-.3:;?ABC..."}   one id per character, in this order
    {"kind": "tiktoken", "encoding": "r50k_base"}       a BPE from tiktoken (r50k_base is GPT-2's)
Either may add "special": ["<|user|>", ...]: tokens that no text encodes to, given the ids after the
base vocabulary's (for GPT-2's BPE 50257.., inside the rows a padded model already has, so no
existing token changes meaning). chat_format.py uses them to mark a conversation's turns.
"""

from nanogpt.errors import UserError

GPT2_VOCAB = {'kind': 'tiktoken', 'encoding': 'r50k_base'}  # OpenAI's GPT-2 BPE, byte for byte


def char_vocab(text):
    """The character-level spec of a text: its distinct characters, sorted by code point."""
    return {'kind': 'char', 'chars': ''.join(sorted(set(text)))}


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
        else:
            raise UserError(f"unknown vocabulary kind {spec['kind']!r} "
                            "(expected 'char' or 'tiktoken')")
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
        return self.enc.encode(text, allowed_special={'<|endoftext|>'})

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
