"""
The GPT language model: GPT-2's architecture in one file, read top to bottom.

References:
1) "Attention Is All You Need" (Vaswani et al. 2017): the Transformer block.
2) "Language Models are Unsupervised Multitask Learners" (GPT-2, Radford et al. 2019): pre-LayerNorm
   blocks, a final LayerNorm, residual projections scaled at init, tanh-approximated GELU.
3) "Language Models are Few-Shot Learners" (GPT-3, Brown et al. 2020): the sizes and the optimizer.
Optional modern parts, each a GPTConfig switch that is off by default (as in modded-nanogpt and nanochat):
4) "RoFormer" (Su et al. 2021): rotary position embeddings instead of learned ones.
5) "Root Mean Square Layer Normalization" (Zhang & Sennrich 2019): RMSNorm instead of LayerNorm.
6) "Scaling Vision Transformers to 22B Parameters" (Dehghani et al. 2023): QK-norm.
7) "Primer" (So et al. 2021): the squared-ReLU MLP.
8) "Muon" (Keller Jordan 2024): orthogonalised momentum for the hidden matrices.
"""

import inspect
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import UserError


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own cannot turn the bias off)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)  # eps as in GPT-2


def norm(config, ndim):
    """The block's normalisation: GPT-2's LayerNorm, or RMSNorm (rescale only, no centring, no bias)."""
    return nn.RMSNorm(ndim, eps=1e-5) if config.rmsnorm else LayerNorm(ndim, bias=config.bias)


def rotary_tables(block_size, head_size, base=10000.0):
    """cos and sin (block_size, head_size // 2) of RoFormer's angles: position t turns the i-th pair of
    channels by t * base^(-2i / head_size)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (block_size, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each pair of channels (x1[i], x2[i]) of x (B, nh, T, hs) by its position's angle (T, hs/2).
    Then q_s . k_t depends on s - t only: attention sees relative positions (Su et al. 2021, eq. 16)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # bf16 under autocast, like q and k
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        # query, key and value projections for all heads, in one matrix
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.qk_norm = config.qk_norm

    def forward(self, x, kv=None, rotary=None):
        B, T, C = x.size()  # batch, sequence length, n_embd
        hs = C // self.n_head
        # one matmul for q, k and v of all heads: (B, T, 3, nh, hs) -> 3 x (B, nh, T, hs), views, no copies
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, hs).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_norm:
            # unit-RMS queries and keys bound the attention logits, so a high learning rate can't blow them up
            q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)  # rotary: the angles of positions t0..t0+T
        decode = kv is not None and kv[2] > 0  # generation: one new position after t0 cached ones
        if kv is not None:
            # this layer's slice of a KVCache, holding t0 earlier positions: write the new keys/values in
            # place after them (a prefill, t0 = 0, has all it needs in k, v); a decode step attends to all
            k_cache, v_cache, t0 = kv  # (B, nh, block_size, hs) each, in the weights' dtype
            k_cache[:, :, t0:t0 + T] = k
            v_cache[:, :, t0:t0 + T] = v
            if decode:
                k, v = k_cache[:, :, :t0 + T], v_cache[:, :, :t0 + T]  # (B, nh, t0 + T, hs)
                q = q.to(k.dtype)
        # softmax(q k^T / sqrt(hs)) v (Vaswani et al. eq. 1); flash kernels on CUDA. Causal over T > 1
        # positions (training, or a prefill into an empty cache); a single new query may see every key.
        # A decode step attends in the cache's dtype even under autocast: for one query that is a few small
        # ops, and CPU bf16 attention kernels took 4x fp32's time (108 against 24 us, 6 heads x 200 keys).
        with torch.autocast(x.device.type, enabled=False) if decode else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.relu2 = config.relu2

    def forward(self, x):
        x = self.c_fc(x)
        if self.relu2:  # ReLU^2: Primer's cheaper, better activation (x * x: faster than square()'s pow on CPU)
            x = F.relu(x)
            x = x * x
        else:
            x = self.gelu(x)
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv=None, rotary=None):
        x = x + self.attn(self.ln_1(x), kv, rotary)
        x = x + self.mlp(self.ln_2(x))
        return x


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan 2024, kellerjordan.github.io/posts/muon): SGD with Nesterov momentum whose update
    of each matrix is orthogonalised, i.e. replaced by U V^T of its SVD U S V^T, so that every direction
    moves by the same amount. A quintic Newton-Schulz iteration approximates U V^T with matmuls only.
    The same algorithm as torch.optim.Muon, whose iteration always runs in bf16: slow on CPUs without
    bf16 matmul units (~1 GFLOP/s on this project's AVX2 test machine); here it runs in fp32 off CUDA."""

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))

    @staticmethod
    def orthogonalise(G, steps):
        a, b, c = 3.4445, -4.7750, 2.0315  # Jordan's coefficients: a steep slope at 0, s -> [~0.7, ~1.2]
        X = G.bfloat16() if G.is_cuda else G.float()
        if G.size(0) > G.size(1):
            X = X.T  # iterate on the wide side: X X^T is the smaller Gram matrix
        X = X / (X.norm() + 1e-7)  # Frobenius norm >= spectral norm: singular values now <= 1
        for _ in range(steps):
            # X <- a X + b (X X^T) X + c (X X^T)^2 X: a quintic polynomial of each singular value
            A = X @ X.T
            B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A A in one call
            X = torch.addmm(X, B, X, beta=a)  # a X + B X
        return (X.T if G.size(0) > G.size(1) else X).to(G.dtype)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(p)
                buf = state['momentum_buffer']
                buf.mul_(group['momentum']).add_(p.grad)
                g = p.grad.add(buf, alpha=group['momentum'])  # Nesterov
                update = self.orthogonalise(g, group['ns_steps'])
                p.mul_(1 - group['lr'] * group['weight_decay'])  # decoupled weight decay
                # a tall matrix's rows are longer than unit: scale so each row moves alike (Jordan's choice)
                p.add_(update, alpha=-group['lr'] * max(1, p.size(0) / p.size(1)) ** 0.5)


class ChainedOptimizer:
    """Several torch optimizers (each owning its own parameters) used as one: steps, zero_grad, param_groups
    and a state_dict of plain tensors, as the training loop, GradScaler and checkpoints expect."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {'chained': [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict):
        if len(state_dict.get('chained', ())) != len(self.optimizers):
            raise UserError("the checkpoint's optimizer state is of another optimizer: resume with the same --optimizer")
        for opt, sd in zip(self.optimizers, state_dict['chained']):
            opt.load_state_dict(sd)


# OpenAI's released GPT-2 checkpoints, as named on the Hugging Face hub (n_layer, n_head, n_embd):
# 124M (12, 12, 768), 350M (24, 16, 1024), 774M (36, 20, 1280), 1558M (48, 25, 1600)
GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
# GPT-2 stores these matrices as Conv1D weights of shape (in, out): the transpose of nn.Linear's (out, in)
HF_TRANSPOSED = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context in tokens (the number of learned positions)
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # Transformer blocks
    n_head: int = 12  # attention heads per block; n_embd must divide by it
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # on attention weights and residual branches; 0 for pretraining, ~0.1+ to finetune
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2; False is a bit better and faster
    # modern options (all off: GPT-2 as published)
    rotary: bool = False  # rotary position embeddings on q and k instead of the learned wpe
    rmsnorm: bool = False  # RMSNorm instead of LayerNorm
    qk_norm: bool = False  # RMS-normalise q and k per head before attention
    relu2: bool = False  # ReLU(x)^2 in the MLP instead of the tanh GELU
    tie_weights: bool = True  # the head reads logits with the token embedding matrix, as GPT-2

    def is_gpt2(self):
        """Whether this is GPT-2's architecture, the one Hugging Face's GPT2LMHeadModel computes."""
        return not (self.rotary or self.rmsnorm or self.qk_norm or self.relu2) and self.tie_weights


class KVCache:
    """The keys and values of every layer for the positions a generation has fed the model so far.
    The buffers are allocated once at full length, so a decode step writes its one new position in
    place instead of growing tensors (torch.cat would copy the whole cache at every token)."""

    def __init__(self, model, batch_size):
        cfg, w = model.config, model.lm_head.weight
        # in the weights' dtype, also under autocast: decode steps attend in it (see CausalSelfAttention)
        shape = (batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)  # (B, nh, block_size, hs)
        self.k = [torch.empty(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layer)]
        self.pos = 0  # positions filled: the next token fed goes to position pos


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from next-token logits (B, vocab_size) -> (B,).
    temperature: divides the logits; 0 picks the most likely token (greedy).
    top_k: sample only among the k most likely tokens.
    top_p: sample only among the fewest most likely tokens whose probabilities add up to top_p or more
    (nucleus sampling, Holtzman et al. 2019).
    generator: a torch.Generator, or a list of one per row: row i then draws its random numbers from
    generator[i] exactly as it would alone, so it samples what it would be sampled alone."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        v, _ = torch.topk(logits, top_k)
        logits = logits.masked_fill(logits < v[:, [-1]], -float('inf'))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the more likely ones before it already hold top_p (the first is always kept)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))  # multinomial renormalises
    if isinstance(generator, (list, tuple)):
        if len(generator) != probs.size(0):
            raise ValueError(f"{len(generator)} generators for {probs.size(0)} rows: give one per row")
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            # learned absolute positions; none with rotary embeddings, which turn q and k by position instead
            **({} if config.rotary else {'wpe': nn.Embedding(config.block_size, config.n_embd)}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm(config, config.n_embd),
        ))
        if config.rotary:
            # not saved in checkpoints (persistent=False): rebuilt from the config
            cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer('rotary_cos', cos, persistent=False)
            self.register_buffer('rotary_sin', sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # Weight tying (Press & Wolf 2017, used by GPT-2): the head reads logits with the embedding matrix.
            self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2 scales the init of each residual projection by 1/sqrt(N), N = 2 * n_layer residual
        # additions, so the variance of the residual stream doesn't grow with depth.
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) for every matrix and embedding, zero biases
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count. The position embedding is left out by default, as is usual when quoting
        model sizes; the token embedding is counted once, since the head shares it."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.rotary:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, cache=None):
        """Logits (and the loss, given targets) of the tokens idx (B, T). With a KVCache, idx continues
        the tokens it holds: T of them into an empty cache (a prefill), or one after them (a decode step)."""
        B, T = idx.size()
        t0 = 0 if cache is None else cache.pos  # positions continue after the cached ones
        if t0 + T > self.config.block_size:
            raise ValueError(f"sequence of length {t0 + T} is longer than block_size {self.config.block_size}")
        if t0 and T > 1:  # the causal mask of T > 1 new queries would not be offset by t0
            raise ValueError("only an empty KVCache takes several tokens at once")
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        rotary = None
        if self.config.rotary:
            rotary = self.rotary_cos[t0:t0 + T], self.rotary_sin[t0:t0 + T]  # positions enter in attention instead
        else:
            pos = torch.arange(t0, t0 + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else (cache.k[i], cache.v[i], t0), rotary)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, vocab_size)
            # mean cross-entropy over all positions; target -1 marks a position to ignore
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # generation only needs the next token: skip the head's matmul for all but the last position
            logits = self.lm_head(x[:, -1:, :])  # (B, 1, vocab_size)
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context, e.g. to finetune GPT-2 (1024) with a shorter block_size."""
        if block_size > self.config.block_size:
            raise ValueError(f"block_size {block_size} is larger than the model's {self.config.block_size}")
        self.config.block_size = block_size
        if self.config.rotary:
            self.rotary_cos, self.rotary_sin = self.rotary_cos[:block_size], self.rotary_sin[:block_size]
        else:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer='adamw',
                             muon_lr=0.02, muon_momentum=0.95):
        """AdamW for every parameter, or with optimizer='muon' Muon for the blocks' matrices and AdamW for
        the rest (embeddings, head, gains, biases), stepped together as one ChainedOptimizer."""
        params = [p for p in self.parameters() if p.requires_grad]
        muon = []
        if optimizer == 'muon':
            # Muon orthogonalises a matrix's update, which suits the hidden layers' linear maps; the
            # embeddings and head are lookups/readouts of tokens, trained best by Adam (Jordan 2024).
            muon = [p for p in self.transformer.h.parameters() if p.requires_grad and p.dim() == 2]
        elif optimizer != 'adamw':
            raise UserError(f"unknown optimizer {optimizer!r} (use 'adamw' or 'muon')")
        # Decay the matrices and embeddings (every parameter of 2+ dimensions); biases and LayerNorm
        # gains keep weight_decay 0, as decaying them only pulls them away from their useful values.
        decay = [p for p in params if p.dim() >= 2 and all(p is not q for q in muon)]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        # fused kernels update all parameters in a few launches instead of ~10 small ops per tensor (CUDA and CPU)
        fused = device_type in ('cuda', 'cpu') and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))
        if not muon:
            return adamw
        # lr_scale: the training loop sets each group's lr to the schedule's lr times this, so Muon follows
        # the same warm-up and decay at its own (much larger) peak
        muon = Muon([{'params': muon, 'lr_scale': muon_lr / learning_rate}], lr=muon_lr,
                    weight_decay=weight_decay, momentum=muon_momentum)
        return ChainedOptimizer(muon, adamw)

    def flops_per_token(self):
        """Training FLOPs per token: 6N for the matmuls of forward + backward (Kaplan et al. 2020,
        appendix B), plus 12 * n_layer * n_embd * T for attention's scores and weighted sum."""
        cfg = self.config
        N = self.get_num_params()
        return 6 * N + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of the device's peak
        (PaLM paper, appendix B). dt is seconds per iteration."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop=None,
                        use_cache=True, keep=None, generator=None):
        """Yield the next token of every row of the prompt idx (B, T), a (B,) tensor per step, for up to
        max_new_tokens steps. Call model.eval() first. Rows are sampled together as one batch.

        temperature, top_k, top_p, generator: as in sample_next (a list of generators, one per row,
        makes each row what sampling it alone with its generator gives).
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
        again (a prefill of block_size tokens per step, as without the cache). With rotary embeddings
        too: a rolling cache (overwrite the oldest key) would keep attention's relative positions right,
        but not the keys themselves: in layers after the first, a cached key was computed from a context
        reaching back before the window, so the logits would differ from a forward pass over the window
        (by ~0.1-0.4 on a tiny 2-layer model, measured); the refill keeps every step exact.
        Under autocast, prefills and refills run in the weights' dtype, decode steps in autocast's.
        """
        B, T = idx.size()
        block_size = self.config.block_size
        keep = block_size // 2 if keep is None else keep
        if not 1 <= keep <= block_size:
            raise ValueError(f"keep must be between 1 and block_size {block_size}, got {keep}")
        if stop is not None:
            stop = torch.tensor([stop] if isinstance(stop, int) else list(stop), device=idx.device)
            ended = torch.zeros(B, dtype=torch.bool, device=idx.device)
        seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # prompt + new tokens
        seq[:, :T] = idx
        cache = KVCache(self, B) if use_cache else None
        for n in range(T, T + max_new_tokens):  # n tokens so far; sample the one at index n
            if cache is None:
                logits, _ = self(seq[:, max(0, n - block_size):n])
            elif cache.pos in (0, block_size):  # prefill the prompt, or refill a full cache
                context = block_size if cache.pos == 0 else keep
                cache.pos = 0
                # in the weights' dtype even under autocast: a prefill multiplies matrices, where bf16 only pays
                # on hardware with bf16 units; decode steps multiply vectors, bound by reading the weights,
                # which bf16 halves everywhere
                with torch.autocast(idx.device.type, enabled=False):
                    logits, _ = self(seq[:, max(0, n - context):n], cache=cache)
            else:
                logits, _ = self(seq[:, n - 1:n], cache=cache)  # only the newest token is new to the cache
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
            if stop is not None:
                idx_next = torch.where(ended, seq[:, n - 1], idx_next)  # an ended row repeats its stop token
                ended |= torch.isin(idx_next, stop)
            seq[:, n] = idx_next
            yield idx_next
            if stop is not None and ended.all():
                return

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop=None,
                 use_cache=True, keep=None, generator=None):
        """The prompt idx (B, T) followed by up to max_new_tokens sampled tokens: (B, T + n), n fewer
        than max_new_tokens only if every row sampled a stop token. The arguments are those of
        generate_stream, which does the work."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, stop, use_cache,
                                        keep, generator))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx

    # ------------------------------------------------------------------------------------------------
    # OpenAI's GPT-2 weights in, Hugging Face GPT-2 folders out

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=None):
        """OpenAI's GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl': downloaded by transformers)
        or a local Hugging Face GPT-2 folder, as a GPT in fp32 on the CPU. The shape is the checkpoint's
        (with biases, as GPT-2); only dropout may be overridden (default 0)."""
        if name_or_path not in GPT2_NAMES and not os.path.isdir(name_or_path):
            raise UserError(f"{name_or_path!r} is neither one of {', '.join(GPT2_NAMES)} nor a folder "
                            "holding a Hugging Face GPT-2 (config.json + weights)")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise UserError("loading GPT-2 needs Hugging Face transformers: pip install transformers") from None
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:  # no network, no such folder content, a foreign config.json
            raise UserError(f"cannot load GPT-2 from {name_or_path!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None
        c = hf.config
        # Our blocks compute GPT-2's function only with GPT-2's choices: the tanh GELU, LayerNorm eps 1e-5,
        # a 4x wide MLP, attention scaled by 1/sqrt(hs) and the head tied to the token embedding.
        if (c.activation_function not in ('gelu_new', 'gelu_pytorch_tanh') or c.layer_norm_epsilon != 1e-5
                or c.n_inner not in (None, 4 * c.n_embd) or not c.scale_attn_weights
                or c.scale_attn_by_inverse_layer_idx or not c.tie_word_embeddings):
            raise UserError(f"{name_or_path} is a GPT-2 variant this model does not compute (activation "
                            f"{c.activation_function}, eps {c.layer_norm_epsilon}, n_inner {c.n_inner}, "
                            f"tied head {c.tie_word_embeddings})")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, bias=True, dropout=dropout or 0.0)
        model = cls(config)
        sd = model.state_dict()
        # older transformers also keep each layer's causal mask as buffers: not weights
        sd_hf = {k: v for k, v in hf.state_dict().items() if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
        if sd.keys() != sd_hf.keys():
            raise UserError(f"{name_or_path}: weights {sorted(sd_hf.keys() ^ sd.keys())[:4]} do not fit GPT-2")
        with torch.no_grad():
            for k, v in sd_hf.items():
                v = v.t() if k.endswith(HF_TRANSPOSED) else v
                assert v.shape == sd[k].shape, (k, v.shape, sd[k].shape)  # copy_ would broadcast
                sd[k].copy_(v)
        return model

    def export_hf(self, folder, eos_token_id=None):
        """Write this model as a Hugging Face GPT-2 folder (config.json + model.safetensors) that
        transformers.GPT2LMHeadModel.from_pretrained loads: the inverse of from_pretrained. A model
        without biases gets zero biases, which compute the same function. eos_token_id is the
        vocabulary's end-of-text token (50256 in GPT-2's BPE), or None when it has none."""
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise UserError("exporting to Hugging Face needs safetensors: pip install safetensors") from None
        c = self.config
        if not c.is_gpt2():
            raise UserError("only GPT-2's architecture exports to a Hugging Face GPT-2 folder: this model has "
                            "rotary, rmsnorm, qk_norm, relu2 or an untied head")
        sd = self.state_dict()
        tensors = {}
        for k, v in sd.items():
            if k == 'lm_head.weight':
                continue  # the same tensor as wte; transformers ties it back on load
            tensors[k] = (v.t() if k.endswith(HF_TRANSPOSED) else v).detach().cpu().contiguous()
            bias = k[:-len('weight')] + 'bias'
            if k.endswith('.weight') and 'wte' not in k and 'wpe' not in k and bias not in sd:
                tensors[bias] = torch.zeros(v.shape[0])  # Linear (out, in) and LayerNorm (n,): out biases
        hf_config = {
            'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': c.vocab_size,
            'n_positions': c.block_size, 'n_layer': c.n_layer, 'n_head': c.n_head, 'n_embd': c.n_embd,
            'n_inner': None, 'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5,
            'resid_pdrop': c.dropout, 'embd_pdrop': c.dropout, 'attn_pdrop': c.dropout,
            'initializer_range': 0.02, 'tie_word_embeddings': True,
            'bos_token_id': eos_token_id, 'eos_token_id': eos_token_id}
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, 'config.json'), 'w') as f:
            json.dump(hf_config, f, indent=2)
        save_file(tensors, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
