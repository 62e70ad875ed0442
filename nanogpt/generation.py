"""
Fast generation: a KV cache, sampling (temperature, top-k, top-p, stop tokens) and the streaming
loop that sample.py, eval.py and bench_sample.py call. model.GPT.generate is nanoGPT's plain loop,
the reference this one is tested against.
"""

import types
from contextlib import nullcontext

import torch
from torch.nn import functional as F

from nanogpt.errors import UserError

# devices whose prefills run under autocast (see decode_precision)
HALF_PRECISION_PREFILL = {'cuda'}


def decode_precision(device_type):
    """The precision rule of decoding, the one sample.py, chat.py, eval.py and the engine follow;
    called under the autocast device.setup chose (fp32 weights stay fp32 in memory: autocast casts
    them). Returns (prefill, cache_dtype). Decode steps multiply vectors, bound by reading the
    weights, whose bytes bf16 halves everywhere, so they run under autocast. On a GPU (tensor
    cores) prefills run under autocast too (prefill is a no-op context), and the cache is in
    autocast's dtype, so a decode step also reads half the bytes of keys and values. Elsewhere
    prefills and refills multiply matrices in the weights' dtype (prefill turns autocast off: bf16
    matrix products are slow without bf16 units), and the cache is in the weights' dtype
    (cache_dtype None), as a decode step's attention there is a few small ops; the caches cast
    what a decode step writes to their dtype."""
    half = device_type in HALF_PRECISION_PREFILL and torch.is_autocast_enabled(device_type)
    prefill = nullcontext() if half else torch.autocast(device_type, enabled=False)
    return prefill, (torch.get_autocast_dtype(device_type) if half else None)


class KVCache:
    """The keys and values of every layer for the positions a generation has fed the model so far.
    The buffers are allocated once at full length, so a decode step writes its one new position in
    place instead of growing tensors (torch.cat would copy the whole cache at every token)."""

    def __init__(self, model, batch_size, dtype=None):
        cfg, w = model.config, model.transformer.wte.weight  # (not the head: it may be int8)
        # (B, nh, block_size, hs); dtype: the weights' unless given (see generate_stream)
        shape = (batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        dtype = dtype or w.dtype
        self.k = [torch.empty(shape, dtype=dtype, device=w.device) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(shape, dtype=dtype, device=w.device) for _ in range(cfg.n_layer)]
        # positions filled: the next token fed goes to position pos (GPT.forward advances it)
        self.pos = 0
        self.mask = None  # every row is at pos: attention's causal mask is all it needs

    def reset(self):
        """Empty the cache (for a prefill or a refill): nothing is cleared, positions restart."""
        self.pos = 0

    def insert(self, layer, k, v):
        """Write one layer's keys and values (B, nh, T, hs) of positions pos..pos+T-1 and return all
        of that layer's so far, (B, nh, pos + T, hs): views of the buffers, no copies."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RowKVCache(KVCache):
    """A KV cache whose rows are at positions of their own, for continuous batching (engine.py): a
    row can start a new text while the others go on with theirs, so that one forward pass decodes
    every row. pos is a (B,) tensor: row b's next token goes to position pos[b] (GPT.forward reads
    it row by row and advances it). A row's keys past its own position are left over from an
    earlier text; attention masks them out (self.mask, set for each forward by insert)."""

    def __init__(self, model, batch_size, dtype=None, static=False):
        super().__init__(model, batch_size, dtype)
        for buf in (*self.k, *self.v):
            buf.zero_()  # a masked key still enters q k^T, and a NaN there would survive the mask
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=self.k[0].device)
        # static: every forward attends over all block_size keys through the mask, so a decode
        # step has the same shapes at every position (what torch.compile and CUDA graphs need)
        self.static = static
        if static and self.pos.is_cuda:  # CUDA graphs replay on these addresses
            for buf in (*self.k, *self.v, self.pos):
                torch._dynamo.mark_static_address(buf)

    def reset(self):
        self.pos.zero_()  # in place: a compiled step holds on to this tensor

    def rows(self, start, stop):
        """The rows start..stop-1 as a cache of their own: views of these buffers, no copies."""
        view = object.__new__(RowKVCache)
        view.k, view.v = [k[start:stop] for k in self.k], [v[start:stop] for v in self.v]
        view.pos, view.mask, view.static = self.pos[start:stop], None, self.static
        return view

    def move(self, src, dst):
        """Copy row src (its keys, values and position) over row dst."""
        n = int(self.pos[src])
        for buf in (*self.k, *self.v):
            buf[dst, :, :n] = buf[src, :, :n]
        self.pos[dst] = n

    def insert(self, layer, k, v):
        """Write one layer's keys and values (B, nh, T, hs) of each row b at positions
        pos[b]..pos[b]+T-1 and return the keys and values of positions 0..max(pos)+T-1 (views).
        At the first layer, also set the mask (B, 1, T, keys) of this forward: a query sees the
        keys of its own row up to its own position. None when every row is at the same position
        and T is 1 (a decode step in step): then every key is the query's own row's, as in
        KVCache, and attention takes the same path as there."""
        B, nh, T, hs = k.size()
        pos = self.pos[:, None] + torch.arange(T, device=k.device)  # (B, T): the new positions
        end = self.k[layer].size(2) if self.static else int(pos.max()) + 1
        rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
        # advanced indices on dims 0 and 2 put them first: (B, T, nh, hs)
        # (indexed writes do not cast as slices do: a decode step under autocast brings bf16)
        self.k[layer][rows, :, pos] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows, :, pos] = v.transpose(1, 2).to(self.v[layer].dtype)
        if layer == 0:
            same = not self.static and T == 1 and bool((self.pos == self.pos[0]).all())
            keys = torch.arange(end, device=k.device)
            self.mask = None if same else (keys[None, None, :] <= pos[:, :, None])[:, None]
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def decode_step(model, cache, idx):
    """The logits (B, vocab_size) of the token after idx (B, T), each row at its cache position."""
    logits, _ = model(idx, cache=cache)
    return logits[:, -1]


def decode_token(model, cache, idx, seeds, step, temperature, top_k, top_p):
    """The next token (B,) after idx (B, T): decode_step's logits through sample_next, drawing with
    seeds (step: the token's index, a tensor, so that one graph serves every step)."""
    return sample_next(decode_step(model, cache, idx), temperature, top_k, top_p, seeds=seeds,
                       step=step)


def compile_decode(model, device_type, sample=True):
    """model's decode step compiled for a static RowKVCache (gpt-fast's recipe): one graph per
    shape of its input, reused at every position (positions are a tensor, keys are always all
    block_size of them behind a mask), so Inductor fuses a step's ~200 small ops into a few
    kernels, and on CUDA the whole step replays as one CUDA graph (kernel launches gone too).
    sample: the step is decode_token, step(cache, idx, seeds, step, temperature, top_k, top_p), the
    sampler in the same graph (generate_stream); else decode_step, step(cache, idx) (the engine).

    The step is this model's as it is now: on a CPU its weights are frozen into the graph as
    constants (bf16 copies under autocast, so no step casts them) and multiplied by Inductor's own
    C++ GEMM kernels, and the model is not checked at each call (dynamo's ~0.1 ms of guards).
    Compile again after changing the model. Compiling takes seconds to tens of seconds
    (docs/sampling.md)."""
    fn = decode_token if sample else decode_step
    # a code object of this step's own: dynamo keeps its graphs per code object, and with the
    # model's guards skipped would give one model's graph to another
    fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
    options = {'triton.cudagraphs': device_type == 'cuda',
               'guard_filter_fn': torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    cpu = device_type == 'cpu'
    if cpu:  # the C++ template as the only choice of matrix product: nothing to benchmark
        options |= {'max_autotune': True, 'max_autotune_gemm_backends': 'CPP'}
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, options=options)

    def step(*args):
        if not cpu:  # (freezing on CUDA is not yet measured)
            return compiled(model, *args)
        # freezing is a global flag read as dynamo traces (options= does not reach it,
        # pytorch#139272); imported here, as importing it takes a second (and imports dynamo)
        import torch._inductor.config as inductor
        frozen, inductor.freezing = inductor.freezing, True
        try:
            return compiled(model, *args)
        finally:
            inductor.freezing = frozen
    return step


def row_uniform(seeds, step):
    """One number in [0, 1) per row, a function of (seeds[i], step) only: a counter-based random
    stream per row (a 32-bit integer hash of seed and step, in a few vectorised int64 ops that never
    overflow), so that many rows draw at the cost of one, and row i draws the same numbers whatever
    the other rows are."""
    def hash32(x):  # Mueller's avalanche hash; x < 2^32, so each product stays below 2^59
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        return (x >> 16) ^ x
    x = hash32((hash32(seeds & 0xFFFFFFFF) + step) & 0xFFFFFFFF)
    return (x.double() + 0.5) / 2**32


def check_sampling(cfg):
    """The sampling knobs a script's config has (temperature, top_k, top_p, max_new_tokens,
    num_samples), checked up front by sample.py, chat.py and eval.py alike."""
    for key in ('max_new_tokens', 'num_samples'):
        if getattr(cfg, key, 1) <= 0:
            raise UserError(f"{key} must be positive, got {getattr(cfg, key)}")
    if not cfg.temperature >= 0:  # also NaN
        raise UserError(f"temperature must be 0 or more, got {cfg.temperature}")
    top_k, top_p = getattr(cfg, 'top_k', None), getattr(cfg, 'top_p', None)
    if top_k is not None and top_k <= 0:
        raise UserError(f"top_k must be positive or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] or None, got {top_p}")


def check_keep(keep, block_size):
    """keep (tokens of context kept when the cache fills up; None: block_size // 2) -> keep."""
    keep = block_size // 2 if keep is None else keep
    if not 1 <= keep <= block_size:
        raise UserError(f"keep must be between 1 and block_size {block_size}, got {keep}")
    return keep


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, seeds=None,
                step=0):
    """One token per row from next-token logits (B, vocab_size) -> (B,).
    temperature: divides the logits; 0 picks the most likely token (greedy).
    top_k: sample only among the k most likely tokens.
    top_p: sample only among the fewest most likely tokens whose probabilities add up to top_p or
    more (nucleus sampling, Holtzman et al. 2019).
    generator: a torch.Generator the whole batch draws from; or seeds, a (B,) int64 tensor: row i
    then draws the uniform number row_uniform(seeds[i], step) and takes the token where it falls in
    the row's cumulative distribution, so it samples what it would sample alone."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        v, _ = torch.topk(logits, top_k)
        logits = logits.masked_fill(logits < v[:, [-1]], -float('inf'))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the more likely ones before it already hold top_p
        # (the first is always kept); both samplers below renormalise
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    if seeds is None:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    cdf = probs.double().cumsum(dim=-1)  # (B, V); fp64, so the last entries stay distinct
    u = row_uniform(seeds, step)[:, None] * cdf[:, -1:]  # in [0, total): never past the last token
    # the first token whose cumulative probability exceeds u: one with probability > 0
    return torch.searchsorted(cdf, u, right=True)[:, 0]


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop=None,
                    use_cache=True, keep=None, generator=None, seeds=None, step=None):
    """Yield the next token of every row of the prompt idx (B, T), a (B,) tensor per step, for up to
    max_new_tokens steps. Call model.eval() first. Rows are sampled together as one batch.

    temperature, top_k, top_p, generator, seeds: as in sample_next (with seeds, a row samples what
    it would sample alone: token n of row i draws row_uniform(seeds[i], n)).
    stop: a token id or a list of ids. A row that samples one has ended: it repeats that token from
    then on, and the stream ends once every row has ended.
    use_cache=False: the classic loop, which re-runs the model over the last block_size tokens at
    every step (an exact sliding window, at block_size times the work per token).
    use_cache=True: a KVCache keeps the keys and values of the tokens seen so far; the prompt (its
    last block_size tokens) goes through the model once (a prefill), then each step feeds only the
    newest token (a decode step). The learned positions end at block_size, so a sliding window
    would need a full recompute per token; instead, when the cache is full, the last `keep` tokens
    of the text (default block_size // 2) are prefilled into an empty cache and decoding goes on.
    Each token then sees between keep and block_size tokens of context, and one prefill of keep
    tokens is spread over block_size - keep steps. keep=block_size is the exact sliding window
    again. With rotary embeddings too: a rolling cache (overwrite the oldest key) would keep
    attention's relative positions right, but not the keys themselves: in layers after the first, a
    cached key was computed from a context reaching back before the window, so the logits would
    differ from a forward pass over the window; the refill keeps every step exact.

    step: compile_decode's compiled step (sample=True; with use_cache), or None for the eager one.
    The cache is then a static RowKVCache, and the step samples too, with seeds (one graph for a
    whole token); refills go through it as well (a graph of their own: always keep tokens), while
    the prompt's prefill stays eager (a shape of its own).

    Dtypes, under autocast: decode_precision's rule.
    """
    B, T = idx.size()
    block_size = model.config.block_size
    keep = check_keep(keep, block_size)
    if stop is not None:
        stop = torch.tensor([stop] if isinstance(stop, int) else list(stop), device=idx.device)
        ended = torch.zeros(B, dtype=torch.bool, device=idx.device)
    # prompt + new tokens
    seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    seq[:, :T] = idx
    prefill, cache_dtype = decode_precision(idx.device.type)

    def sample(logits, n):
        return sample_next(logits, temperature, top_k, top_p, generator, seeds, step=n)

    def eager(x, n):  # the next token after x, fed to the cache
        return sample(decode_step(model, cache, x), n)
    if not use_cache:
        cache = None
    elif step is None:
        cache, token = KVCache(model, B, cache_dtype), eager
    else:
        if temperature and seeds is None:
            raise ValueError("a compiled step samples with seeds (one random stream per row)")
        cache = RowKVCache(model, B, cache_dtype, static=True)
        n_ = torch.zeros((), dtype=torch.long, device=idx.device)  # the token's index, in place

        def token(x, n):
            n_.fill_(n)
            return step(cache, x, seeds, n_, temperature, top_k, top_p)
    x = torch.empty(B, 1, dtype=torch.long, device=idx.device)  # a decode step's input, in place
    filled = 0  # positions in the cache
    for n in range(T, T + max_new_tokens):  # n tokens so far; sample the one at index n
        if cache is None:
            idx_next = sample(model(seq[:, max(0, n - block_size):n])[0][:, -1], n)
        elif filled in (0, block_size):  # prefill the prompt, or refill a full cache
            context = seq[:, max(0, n - (block_size if filled == 0 else keep)):n]
            cache.reset()
            with prefill:
                idx_next = (token if filled else eager)(context, n)
            filled = context.size(1)
        else:
            # only the newest token is new to the cache
            x.copy_(seq[:, n - 1:n])
            idx_next = token(x, n)  # (B,)
            filled += 1
        if stop is not None:
            # an ended row repeats its stop token
            idx_next = torch.where(ended, seq[:, n - 1], idx_next)
            ended |= torch.isin(idx_next, stop)
        seq[:, n] = idx_next
        yield idx_next
        if stop is not None and ended.all():
            return


def generate(model, idx, max_new_tokens, **kwargs):
    """The prompt idx (B, T) followed by up to max_new_tokens sampled tokens: (B, T + n), n fewer
    than max_new_tokens only if every row sampled a stop token. kwargs: those of generate_stream."""
    new = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
