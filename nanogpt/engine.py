"""
Continuous batching: many texts decoded together by one forward pass per step, each joining when
its request arrives and leaving when it is done. serve.py runs an Engine in a thread of its own:

    engine = Engine(model, tokenizer)
    threading.Thread(target=engine.run, daemon=True).start()
    engine.submit([Row(tokenizer.encode("ROMEO:"), max_tokens=50, emit=print)])

One step of the loop (Engine.step):
1. rows whose client left are dropped; waiting rows join while there is room (max_rows);
2. the new rows' prompts, all but their last token, go through the model together into the rows'
   own slots of a RowKVCache (one batched prefill, padded at the end: a row's pads come after its
   tokens, so causal attention keeps them out of its real positions, and its position is set back
   to its own length); a row whose slot is full is refilled with its last `keep` tokens, as
   generation.generate_stream does;
3. one decode step for every row at once: each feeds its newest token at its own position (with
   compile, generation.compile_decode's step, on the rows padded up to a bucket: 1, 4, 16, ...);
4. each row samples its next token with its own temperature, top-k/p and random stream, its text
   is checked against its stop strings, and what is new is handed to its emit(); a finished row
   leaves, and the last row moves into its slot, so the rows in use are always slots 0..n-1 and a
   step's batch is a view of the cache, not a copy.
Feeding the prompt's last token in the decode step rather than in the prefill keeps every row in
that one batched call; its logits equal a whole-prompt prefill's to float rounding (~1e-6).
"""

import queue
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from nanogpt.generation import RowKVCache, check_keep, compile_decode, decode_precision, sample_next


@dataclass(eq=False)
class Row:
    """One text to generate. emit(event) is called from the engine's thread with a dict:
    {'echo': [(id, logprob, top), ...], 'finish_reason': None} first, when echo is set: the prompt's
        tokens, each
        with its log-probability given the ones before (None for the first) and top, the
        `logprobs` most likely tokens there ({id: logprob}, None for the first);
    {'token': id, 'text': new text, 'logprob': lp, 'top': {id: lp}, 'finish_reason': None} for
        each sampled token (logprob and top when `logprobs` is set: the model's own distribution,
        before temperature and top-k/p), finish_reason 'stop' or 'length' on the last one;
    {'error': message, 'finish_reason': 'error'} if the engine failed (the server goes on)."""
    prompt: list  # token ids
    max_tokens: int
    emit: object  # callable
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0  # token n (counting the prompt's) draws row_uniform(seed, n), as in sample.py
    stop: tuple = ()  # strings that end the text; the text stops before the first one
    stop_token: int | None = None  # a token that ends the text (a BPE's <|endoftext|>)
    logprobs: int | None = None  # report each token's log-probability and this many top tokens
    echo: bool = False  # report the prompt's log-probabilities too
    cancelled: bool = False  # set from any thread (the client left): leaves at the next step
    tokens: list = field(default_factory=list)  # prompt + sampled so far (the engine's)
    fresh: bool = True  # not prefilled yet
    sent: int = 0  # characters of the new text already emitted


def held_back(text, stops):
    """How many characters at the end of text to hold back: the longest end that could be the start
    of a stop string, and an unfinished UTF-8 character (a BPE token may end inside one)."""
    n = len(text) - len(text.rstrip('\ufffd'))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


class Engine:

    def __init__(self, model, tokenizer, max_rows=32, autocast=None, keep=None, compile=False):
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self.block_size = model.config.block_size
        self.keep = check_keep(keep, self.block_size)
        # dtypes: generation.decode_precision's rule, as in sample.py; each step runs under autocast
        self.autocast = autocast or nullcontext()  # reentered at every step
        with self.autocast:
            self.prefill_precision, cache_dtype = decode_precision(model.lm_head.weight.device.type)
        self.cache = RowKVCache(model, max_rows, cache_dtype, static=compile)
        self.device = model.lm_head.weight.device
        # compile: a decode step for each bucket of rows (powers of 4, and max_rows), compiled by
        # warm_up(); a step of n rows runs the smallest bucket >= n, padded with free slots
        self.buckets = ([b for b in (4 ** i for i in range(8)) if b < max_rows] + [max_rows]
                        if compile else [])
        self.compiled = compile_decode(model, self.device.type, sample=False) if compile else None
        self.waiting = queue.Queue()  # rows submitted, not yet in the batch; None stops run()
        self.active = []  # the rows in the batch: active[i] is in slot i of the cache

    def submit(self, rows):
        """Queue rows for decoding (from any thread)."""
        for row in rows:
            row.tokens = list(row.prompt)
            self.waiting.put(row)

    def stop(self):
        self.waiting.put(None)

    def warm_up(self, log=print):
        """Compile the decode step of every bucket (when compile is on): tens of seconds on a CPU,
        once, before the first request rather than in its first-token latency."""
        for b in self.buckets:
            t0 = time.perf_counter()
            with torch.no_grad(), self.autocast:
                self.decode(torch.zeros(b, 1, dtype=torch.long, device=self.device))
            self.cache.reset()
            log(f"compiled the decode step for {b} rows in {time.perf_counter() - t0:.1f} s")

    def decode(self, x):
        """Logits (n, vocab_size) of one decode step of rows 0..n-1, fed x (n, 1)."""
        n = len(x)
        if self.compiled is None:
            return self.model(x, cache=self.cache.rows(0, n))[0][:, -1]
        b = next(b for b in self.buckets if b >= n)
        self.cache.pos[n:b] = 0  # free slots ride along at position 0 (their writes are unread)
        x = torch.cat([x, x.new_zeros(b - n, 1)])
        return self.compiled(self.cache.rows(0, b), x)[:n]

    def run(self):
        """Decode until stop(): block while there is nothing to do, else step."""
        self.warm_up()
        while True:
            if not self.active:
                row = self.waiting.get()  # sleep until a row arrives
                if row is None:
                    return
                self.waiting.put(row)  # the queue keeps its order: admitted in step()
            try:
                with torch.no_grad(), self.autocast:
                    self.step()
            except Exception as e:  # a bug or out of memory: fail these rows, keep serving
                traceback.print_exc()
                for row in self.active:
                    row.emit({'error': f"generation failed: {type(e).__name__}: {e}",
                              'finish_reason': 'error'})
                self.active = []

    def remove(self, i):
        """Free slot i: the last row moves into it, so the rows in use stay slots 0..n-1."""
        last = len(self.active) - 1
        if i != last:
            self.cache.move(last, i)
            self.active[i] = self.active[last]
        self.active.pop()

    def prefill(self, start, rows):
        """Put each row's context but its last token into its slot, start + its index: the
        prompt's last block_size tokens for a new row, its last `keep` tokens for a full slot; one
        forward for all, padded at the end to the longest. Emits the echoes asked for."""
        contexts = [row.tokens[-(self.block_size if row.fresh else self.keep):] for row in rows]
        lengths = [len(c) - 1 for c in contexts]
        T = max(lengths)
        cache = self.cache.rows(start, start + len(rows))
        cache.pos.zero_()
        echo = any(row.fresh and row.echo for row in rows)
        if T > 0:
            x = torch.tensor([c[:-1] + [0] * (T - n) for c, n in zip(contexts, lengths)],
                             device=self.device)  # (rows, T)
            # targets only to get the logits of every position (the echoes'), not just the last
            y = (torch.tensor([c[1:] + [-1] * (T - n) for c, n in zip(contexts, lengths)],
                              device=self.device) if echo else None)
            with self.prefill_precision:
                logits, _ = self.model(x, targets=y, cache=cache)
            # each row's own length: its pads' keys lie past its position, masked until overwritten
            cache.pos.copy_(torch.tensor(lengths, device=self.device))
        for b, (row, context) in enumerate(zip(rows, contexts)):
            if row.fresh and row.echo:
                echo = [(row.tokens[0], None, None)]
                if len(context) > 1:
                    logp = F.log_softmax(logits[b, :lengths[b]].float(), dim=-1)  # (T_b, vocab)
                    for t, token in enumerate(context[1:]):
                        echo.append((token, logp[t, token].item(),
                                     self.top(logp[t], row.logprobs)))
                row.emit({'echo': echo, 'finish_reason': None})
            row.fresh = False

    @staticmethod
    def top(logp, k):
        values, ids = logp.topk(k) if k else (logp[:0], logp[:0])
        return dict(zip(ids.tolist(), values.tolist()))

    def step(self):
        """Admit, prefill, decode every row one token, sample, emit, retire."""
        for i in reversed(range(len(self.active))):
            if self.active[i].cancelled:
                self.remove(i)
        while len(self.active) < self.max_rows:
            try:
                row = self.waiting.get_nowait()
            except queue.Empty:
                break
            if row is None:  # stop(): leave it for run() to see once the batch is done
                self.waiting.put(row)
                break
            if not row.cancelled:
                self.active.append(row)
        # new rows joined at the end: slots first..n-1, prefilled together
        first = next((i for i, row in enumerate(self.active) if row.fresh), len(self.active))
        for i, row in enumerate(self.active[:first]):
            if self.cache.pos[i] == self.block_size:  # a full slot: refill it
                self.prefill(i, [row])
        if first < len(self.active):
            self.prefill(first, self.active[first:])
        n = len(self.active)
        if n == 0:
            return
        x = torch.tensor([[row.tokens[-1]] for row in self.active], device=self.device)  # (n, 1)
        logits = self.decode(x)  # (n, vocab_size)

        # sample: rows with the same settings together, each row on its own random stream
        seeds = torch.tensor([row.seed for row in self.active], device=self.device)
        steps = torch.tensor([len(row.tokens) for row in self.active], device=self.device)
        next_ids = torch.empty(n, dtype=torch.long, device=self.device)
        groups = {}
        for i, row in enumerate(self.active):
            groups.setdefault((row.temperature, row.top_k, row.top_p), []).append(i)
        for (temperature, top_k, top_p), rows in groups.items():
            rows = torch.tensor(rows, device=self.device)
            next_ids[rows] = sample_next(logits[rows], temperature, top_k, top_p,
                                         seeds=seeds[rows], step=steps[rows])
        want = [i for i, row in enumerate(self.active) if row.logprobs is not None]
        logp = F.log_softmax(logits[want].float(), dim=-1) if want else None

        done = []
        for i, (row, token) in enumerate(zip(self.active, next_ids.tolist())):
            row.tokens.append(token)
            new = row.tokens[len(row.prompt):]
            event = {'token': token, 'finish_reason': None}
            if row.logprobs is not None:
                lp = logp[want.index(i)]
                event.update(logprob=lp[token].item(), top=self.top(lp, row.logprobs))
            if token == row.stop_token:
                text, event['finish_reason'] = self.tokenizer.decode(new[:-1]), 'stop'
            else:
                text = self.tokenizer.decode(new)
            cuts = [c for c in (text.find(s, max(0, row.sent - len(s))) for s in row.stop)
                    if c >= 0]
            if cuts:
                text, event['finish_reason'] = text[:min(cuts)], 'stop'
            elif event['finish_reason'] is None and len(new) >= row.max_tokens:
                event['finish_reason'] = 'length'
            end = len(text) if event['finish_reason'] else len(text) - held_back(text, row.stop)
            event['text'] = text[row.sent:end]
            row.sent = max(row.sent, end)
            row.emit(event)
            if event['finish_reason']:
                done.append(i)
        for i in reversed(done):
            self.remove(i)

    def load(self):
        """Rows decoding and rows waiting (approximately: other threads may be submitting)."""
        return len(self.active), self.waiting.qsize()
