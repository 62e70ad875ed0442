"""
The GPT language model: GPT-2's architecture in one file, read top to bottom.

References:
1) "Attention Is All You Need" (Vaswani et al. 2017): the Transformer block.
2) "Language Models are Unsupervised Multitask Learners" (GPT-2, Radford et al. 2019): pre-LayerNorm
   blocks, a final LayerNorm, residual projections scaled at init, tanh-approximated GELU.
3) "Language Models are Few-Shot Learners" (GPT-3, Brown et al. 2020): the sizes and the optimizer.
Optional modern parts, each a GPTConfig switch, off by default (as in modded-nanogpt, nanochat):
4) "RoFormer" (Su et al. 2021): rotary position embeddings instead of learned ones.
5) "Root Mean Square Layer Normalization" (Zhang & Sennrich 2019): RMSNorm instead of LayerNorm.
6) "Scaling Vision Transformers to 22B Parameters" (Dehghani et al. 2023): QK-norm.
7) "Primer" (So et al. 2021): the squared-ReLU MLP.

Everything around the network has its own home: optimizers.py (AdamW groups, Muon), generation.py
(the KV cache and sampling loop), hf.py (OpenAI's GPT-2 weights in, Hugging Face folders out).
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own cannot turn the bias off)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)  # eps as in GPT-2


def norm(config, ndim):
    """The block's normalisation: GPT-2's LayerNorm, or RMSNorm (rescale only, no centring)."""
    return nn.RMSNorm(ndim, eps=1e-5) if config.rmsnorm else LayerNorm(ndim, bias=config.bias)


def rotary_tables(block_size, head_size, base=10000.0):
    """cos and sin (block_size, head_size // 2) of RoFormer's angles: position t turns the i-th pair
    of channels by t * base^(-2i / head_size)."""
    # on the CPU even while a model is built on the meta device: these buffers are not loaded
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32, device='cpu')
                        / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32, device='cpu'),
                         inv_freq)  # (block_size, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each pair of channels (x1[i], x2[i]) of x (B, nh, T, hs) by its position's angle
    (1, T, hs/2), or (B, 1, T, hs/2) for rows at their own positions. Then q_s . k_t depends on
    s - t only: attention sees relative positions (Su et al. 2021, eq. 16)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # bf16 under autocast, like q and k
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.layer_idx = layer_idx  # which of a KV cache's layers is this one's
        # query, key and value projections for all heads, in one matrix
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.qk_norm = config.qk_norm

    def forward(self, x, rotary=None, cache=None):
        B, T, C = x.size()  # batch, sequence length, n_embd
        hs = C // self.n_head
        # one matmul for q, k and v of all heads:
        # (B, T, 3, nh, hs) -> 3 x (B, nh, T, hs), views, no copies
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, hs).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_norm:
            # unit-RMS queries and keys bound the attention logits,
            # so a high learning rate can't blow them up
            q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
        if rotary is not None:
            # the angles of these T positions
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            # generation (generation.KVCache): store the new keys and values, attend to all so far,
            # in the cache's dtype (the decode step's policy lives in generation.py)
            k, v = cache.insert(self.layer_idx, k, v)  # (B, nh, t0 + T, hs)
            q = q.to(k.dtype)
        # rows at their own positions (generation.RowKVCache) bring a mask (B, 1, T, keys)
        mask = None if cache is None else cache.mask
        # softmax(q k^T / sqrt(hs)) v (Vaswani et al. eq. 1), flash kernels on CUDA; causal over
        # T > 1 positions (training, a prefill into an empty cache); one new query sees every key
        with torch.autocast(x.device.type, enabled=False) if cache is not None else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0,
                is_causal=T > 1 and mask is None)
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
        # ReLU^2: Primer's cheaper, better activation (x * x rather than a pow kernel)
        if self.relu2:
            x = F.relu(x)
            x = x * x
        else:
            x = self.gelu(x)
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rotary=None, cache=None):
        x = x + self.attn(self.ln_1(x), rotary, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context in tokens (the number of learned positions)
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # Transformer blocks
    n_head: int = 12  # attention heads per block; n_embd must divide by it
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # on attention weights and residual branches; pretrain 0, finetune ~0.1+
    bias: bool = True  # in Linears and LayerNorms, as GPT-2; False is a bit better and faster
    # modern options (all off: GPT-2 as published)
    rotary: bool = False  # rotary position embeddings on q and k instead of the learned wpe
    rmsnorm: bool = False  # RMSNorm instead of LayerNorm
    qk_norm: bool = False  # RMS-normalise q and k per head before attention
    relu2: bool = False  # ReLU(x)^2 in the MLP instead of the tanh GELU
    tie_weights: bool = True  # the head reads logits with the token embedding matrix, as GPT-2

    def is_gpt2(self):
        """Whether this is GPT-2's architecture, the one Hugging Face's GPT2LMHeadModel computes."""
        return all(getattr(self, k) == getattr(GPTConfig, k) for k in MODERN_SWITCHES)


# the switches that leave GPT-2's architecture when changed from their defaults
MODERN_SWITCHES = ('rotary', 'rmsnorm', 'qk_norm', 'relu2', 'tie_weights')


class SkipInit(torch.overrides.TorchFunctionMode):
    """Random-init calls as no-ops, for a model whose tensors a state dict replaces: on the meta
    device they do nothing anyway, but normal_'s meta kernel imports torch._dynamo, ~1 s of every
    sample.py start (measured on a 2-core CPU, docs/sampling.md)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, '__module__', None) == 'torch.nn.init':  # normal_, kaiming_uniform_...
            return args[0] if args else kwargs['tensor']
        return func(*args, **(kwargs or {}))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            # learned absolute positions; none with rotary embeddings,
            # which turn q and k by position instead
            **({} if config.rotary else {'wpe': nn.Embedding(config.block_size, config.n_embd)}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=norm(config, config.n_embd),
        ))
        if config.rotary:
            # not saved in checkpoints (persistent=False): rebuilt from the config
            cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer('rotary_cos', cos, persistent=False)
            self.register_buffer('rotary_sin', sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # weight tying (Press & Wolf 2017, GPT-2): the head reads logits with the embedding
            self.transformer.wte.weight = self.lm_head.weight
        # train.py's activation_checkpointing: blocks keep their input only, recompute in backward
        self.checkpoint_blocks = False

        self.apply(self._init_weights)
        # GPT-2 scales the init of each residual projection by 1/sqrt(N), N = 2 * n_layer residual
        # additions, so the variance of the residual stream doesn't grow with depth.
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_state_dict(cls, config, state_dict, adapt=None):
        """The GPT of config holding state_dict's tensors as its own, without copying them or the
        random init they replace (built on the meta device first). adapt(model), if given, changes
        the model before loading (lora.apply_lora, for the state of a LoRA run)."""
        with torch.device('meta'), SkipInit():
            model = cls(config)
            if adapt:
                adapt(model)
        model.load_state_dict(state_dict, assign=True)
        if config.tie_weights:  # assign=True made the tied matrix two Parameters: tie them again
            model.transformer.wte.weight = model.lm_head.weight
        return model

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

    def forward(self, idx, targets=None, cache=None, reduction='mean'):
        """Logits (and the loss, given targets) of the tokens idx (B, T). With a KVCache, idx
        continues its tokens: T of them into an empty cache (a prefill), or one (a decode step)."""
        B, T = idx.size()
        # positions continue after the cached ones: an int, or a (B,) tensor of each row's own (not
        # checked in a compiled decode step: reading a position from the device splits its graph)
        t0 = 0 if cache is None else cache.pos
        per_row = torch.is_tensor(t0)
        end = 0 if torch.compiler.is_compiling() else (int(t0.max()) if per_row else t0) + T
        if end > self.config.block_size:
            raise ValueError(f"{end} tokens: more than block_size {self.config.block_size}")
        if not per_row and t0 and T > 1:  # the causal mask of T new queries would not start at t0
            raise ValueError("only an empty KVCache takes several tokens at once")
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        pos = torch.arange(T, device=idx.device) + (t0[:, None] if per_row else t0)  # (T,), (B, T)
        rotary = None
        if self.config.rotary:
            # positions enter in attention instead: (1 or B, 1, T, hs/2), broadcast over the heads
            rotary = self.rotary_cos[pos].unsqueeze(-3), self.rotary_sin[pos].unsqueeze(-3)
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rotary, use_reentrant=False)
            else:
                x = block(x, rotary, cache)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, vocab_size)
            # cross-entropy per position, averaged ('mean') or not ('none': (B*T,), eval.py);
            # target -1 is ignored (a chat's other turns): 0 there, 0 for a batch of only those
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1, reduction=reduction)
            if reduction == 'mean':
                loss = torch.where((targets != -1).any(), loss, 0.0)
        else:
            # generation only needs the next token:
            # skip the head's matmul for all but the last position
            logits = self.lm_head(x[:, -1:, :])  # (B, 1, vocab_size)
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context, e.g. to finetune GPT-2 (1024) with a shorter block_size."""
        if block_size > self.config.block_size:
            raise ValueError(f"block_size {block_size} is larger than the model's "
                             f"{self.config.block_size}")
        self.config.block_size = block_size
        if self.config.rotary:
            self.rotary_cos, self.rotary_sin = (self.rotary_cos[:block_size],
                                                self.rotary_sin[:block_size])
        else:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self):
        """Training FLOPs per token: 6N for forward + backward matmuls (Kaplan et al. 2020, app. B),
        plus 12 * n_layer * n_embd * T for attention's scores and weighted sum. N: the matrices a
        token is multiplied by (not wpe nor an untied wte, lookups; the head, tied or not)."""
        cfg = self.config
        n = self.get_num_params()
        if not cfg.tie_weights:
            n -= self.transformer.wte.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """nanoGPT's plain loop (model.eval() first), the reference for generation.py's KV cache:
        append max_new_tokens tokens to idx (B, T), each from a full pass; temperature 0: greedy."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :]  # (B, vocab_size): the next token's
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
