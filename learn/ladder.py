"""
The ladder of Karpathy's "Let's build GPT" lecture, from a bigram model to our GPT, one idea a rung.

    python data/shakespeare_char/prepare.py
    python learn/ladder.py                                    # all rungs: 7-10 minutes, 2 CPU cores
    python learn/ladder.py --rungs=bigram,heads --max_iters=500 --device=cuda

Each rung above the first two is a subclass of the one below that overrides only what its idea adds;
docs/ladder.md walks the ladder with a measured table. Every rung trains on the same batches for the
same steps, then prints a row: parameters, learning rate, train and val loss, seconds and 100
sampled characters (' / ' marks a newline).
The top rung computes model.GPT's function under model.GPT's parameter names (bias=False, as
train.py trains it): tests/test_ladder.py loads one's state_dict into the other, compares logits.
Equation numbers are those of "Attention Is All You Need" (Vaswani et al. 2017).
"""

import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import cli  # noqa: E402
from nanogpt.dataset import batch_seed, estimate_loss, get_batch, open_dataset  # noqa: E402
from nanogpt.device import resolve_device  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.tokenizer import Tokenizer  # noqa: E402


@dataclass
class LadderConfig:
    rungs: str = 'all'  # comma-separated rung names (see RUNGS), or 'all'
    data_dir: str = ''  # the prepared bins; '' reads data/shakespeare_char
    # one budget for every rung: the model and batches of config/train_shakespeare_char_cpu.py
    max_iters: int = 1000  # half the CPU recipe's steps: all seven rungs in minutes on a laptop
    batch_size: int = 12
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1  # only the top rung drops
    learning_rate: float | None = None  # AdamW's peak for every rung; None: each rung's own best
    warmup_iters: int = 100
    eval_iters: int = 100  # batches per split in the loss estimate after training a rung
    seed: int = 1337  # the same initialisation seed and batches for every rung
    device: str = 'auto'


class Rung(nn.Module):
    """What every rung shares: next-token logits (B, T, vocab) of idx (B, T), their mean
    cross-entropy, and GPT-2's initialisation."""

    # AdamW's peak, the best of 1e-3, 3e-3 and 1e-2 at the default budget (docs/ladder.md). Adam
    # moves each weight ~lr a step, and a shallow net's logits need weights far from their init.
    learning_rate = 1e-2

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def forward(self, idx, targets=None):
        logits = self.logits(idx)  # (B, T, vocab_size)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def init_weights(self):
        # N(0, 0.02) as GPT-2: every logit starts near 0, so the first loss is ln(vocab_size), the
        # loss of a uniform guess; LayerNorm gains (1-d) start at 1
        for p in self.parameters():
            nn.init.normal_(p, std=0.02) if p.dim() == 2 else nn.init.ones_(p)


class Bigram(Rung):
    """Rung 1: the next token from the current one alone: p(x_{t+1} | x_t) = softmax(W[x_t])."""

    def __init__(self, cfg, vocab_size):
        super().__init__(cfg)
        self.table = nn.Embedding(vocab_size, vocab_size)

    def logits(self, idx):
        return self.table(idx)


class OneHead(Rung):
    """Rung 2: tokens read earlier tokens. Position t matches its query against the keys of
    positions s <= t and takes the weighted mean of their values:
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V (eq. 1). Tokens and positions become
    n_embd-wide vectors; the head reads logits off the token embedding (weight tying, Press & Wolf
    2017, as GPT-2)."""

    deep = False  # one layer: stacked without residual connections, layers do not train (rung 5)

    def __init__(self, cfg, vocab_size):
        super().__init__(cfg)
        C = cfg.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, C),  # what each token is
            wpe=nn.Embedding(cfg.block_size, C),  # where it is: attention alone ignores order
            h=nn.ModuleList([self.layer(cfg) for _ in range(cfg.n_layer if self.deep else 1)])))
        self.lm_head = nn.Linear(C, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def layer(self, cfg):
        # queries, keys and values in one matrix: W^Q, W^K, W^V side by side (C -> 3C)
        c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        return nn.ModuleDict(dict(attn=nn.ModuleDict(dict(c_attn=c_attn))))

    def logits(self, idx):
        x = self.embed(idx)
        for layer in self.transformer.h:
            x = self.block(layer, x)
        return self.readout(x)

    def embed(self, idx):
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)

    def block(self, layer, x):
        return self.attention(layer.attn, x)

    def attention(self, attn, x):
        q, k, v = attn.c_attn(x).chunk(3, dim=-1)  # (B, T, C) each: one head as wide as the model
        return self.attention_weights(q, k) @ v  # (B, T, T) x (B, T, C) -> (B, T, C)

    def attention_weights(self, q, k):
        T = q.size(-2)
        # (..., T, T); dividing by sqrt(d_k) keeps the scores ~unit-variance, the softmax soft
        att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # s > t: unwritten
        return F.softmax(att.masked_fill(future, float('-inf')), dim=-1)

    def readout(self, x):
        return self.lm_head(x)  # (B, T, vocab_size)


class MultiHead(OneHead):
    """Rung 3: n_head heads of n_embd / n_head channels each attend separately, each to what it is
    looking for; MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O (section 3.2.2)."""

    def layer(self, cfg):
        layer = super().layer(cfg)
        layer.attn.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)  # W^O
        return layer

    def attention(self, attn, x):
        B, T, C = x.size()
        nh = self.cfg.n_head
        qkv = attn.c_attn(x).view(B, T, 3, nh, C // nh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs): heads attend side by side
        y = self.attention_weights(q, k) @ v  # (B, nh, T, hs)
        return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))  # the heads side by side, then W^O


class FeedForward(MultiHead):
    """Rung 4: after the tokens talk, each one thinks alone: FFN(x) = max(0, x W_1) W_2 (eq. 2),
    4x wide, with GPT-2's tanh GELU for max(0, .). Attention then MLP: a block."""

    def layer(self, cfg):
        layer = super().layer(cfg)
        layer.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False),
                                       c_proj=nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)))
        return layer

    def block(self, layer, x):
        return self.feed_forward(layer.mlp, self.attention(layer.attn, x))

    def feed_forward(self, mlp, x):
        return mlp.c_proj(F.gelu(mlp.c_fc(x), approximate='tanh'))  # (B, T, 4C) -> (B, T, C)


class Residual(FeedForward):
    """Rung 5: each sublayer adds to the stream instead of replacing it, x + Sublayer(x)
    (section 3.1; He et al. 2015): gradients reach the first block undiminished, so blocks stack."""

    deep = True  # n_layer blocks
    learning_rate = 3e-3  # unnormalised, a sum of 2 * n_layer branches diverges at 1e-2

    def block(self, layer, x):
        x = x + self.attention(layer.attn, x)
        return x + self.feed_forward(layer.mlp, x)

    def init_weights(self):
        super().init_weights()
        # GPT-2: the 2 * n_layer projections into the stream start 1/sqrt(2 * n_layer) smaller,
        # so that the sum of their outputs keeps the stream's variance from growing with depth
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))


class LayerNorm(Residual):
    """Rung 6: each sublayer reads its input normalised to zero mean and unit variance per token
    (Ba et al. 2016), x + Sublayer(LayerNorm(x)), and the head reads a normalised stream: GPT-2's
    pre-norm; the paper normalises after the addition, LayerNorm(x + Sublayer(x)) (section 3.1)."""

    def __init__(self, cfg, vocab_size):
        super().__init__(cfg, vocab_size)
        self.transformer.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)

    def layer(self, cfg):
        layer = super().layer(cfg)
        layer.ln_1 = nn.LayerNorm(cfg.n_embd, bias=False)
        layer.ln_2 = nn.LayerNorm(cfg.n_embd, bias=False)
        return layer

    def block(self, layer, x):
        x = x + self.attention(layer.attn, layer.ln_1(x))
        return x + self.feed_forward(layer.mlp, layer.ln_2(x))

    def readout(self, x):
        return super().readout(self.transformer.ln_f(x))


class Dropout(LayerNorm):
    """Rung 7, our GPT: in training, zero a random fraction `dropout` of the embeddings, attention
    weights and sublayer outputs (Srivastava et al. 2014; section 5.4), so that no unit can lean on
    another one being there."""

    def drop(self, x):
        return F.dropout(x, self.cfg.dropout, self.training)  # the rest scaled by 1 / (1 - dropout)

    def embed(self, idx):
        return self.drop(super().embed(idx))

    def attention_weights(self, q, k):
        return self.drop(super().attention_weights(q, k))

    def attention(self, attn, x):
        return self.drop(super().attention(attn, x))

    def feed_forward(self, mlp, x):
        return self.drop(super().feed_forward(mlp, x))


RUNGS = {'bigram': Bigram, 'head': OneHead, 'heads': MultiHead, 'mlp': FeedForward,
         'residual': Residual, 'layernorm': LayerNorm, 'dropout': Dropout}


def build(rung, cfg, vocab_size):
    torch.manual_seed(cfg.seed)
    model = RUNGS[rung](cfg, vocab_size)
    model.init_weights()
    return model


def get_lr(it, peak, cfg):
    """Linear warm-up, then cosine decay to a tenth of the peak at the last step, as train.py."""
    if it < cfg.warmup_iters:
        return peak * (it + 1) / (cfg.warmup_iters + 1)
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)  # 0 -> 1
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, data, cfg, device):
    peak = cfg.learning_rate or model.learning_rate
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.99))
    for it in range(cfg.max_iters):
        for group in optimizer.param_groups:
            group['lr'] = get_lr(it, peak, cfg)
        seed = batch_seed(cfg.seed, 'train', it)  # step it's batch: the same for every rung
        x, y = get_batch(data, cfg.block_size, cfg.batch_size, seed, device=device)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train.py: no step too large
        optimizer.step()


@torch.no_grad()
def sample(model, tokenizer, n, block_size, seed, device):
    """n characters after a newline, drawn from the model's distribution (temperature 1)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor([tokenizer.encode('\n')], device=device)  # (1, 1)
    for _ in range(n):
        logits, _ = model(idx[:, -block_size:])  # the positions end at block_size
        probs = F.softmax(logits[0, -1].float().cpu(), dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g).to(device)[None]], dim=1)
    return tokenizer.decode(idx[0, 1:].tolist())


def main(cfg):
    names = list(RUNGS) if cfg.rungs == 'all' else cfg.rungs.split(',')
    unknown = [n for n in names if n not in RUNGS]
    if unknown:
        raise UserError(f"unknown rung {unknown[0]!r} (rungs: {', '.join(RUNGS)}, or all)")
    device = resolve_device(cfg.device)
    vocab, splits = open_dataset('shakespeare_char', cfg.data_dir, cfg.block_size)
    tokenizer = Tokenizer(vocab)
    print(f"{cfg.max_iters} steps of {cfg.batch_size} x {cfg.block_size} characters, {device}")
    print('| rung | parameters | lr | train loss | val loss | time (s) | sample |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | --- |')
    for name in names:
        t0 = time.time()
        model = build(name, cfg, tokenizer.vocab_size).to(device)
        train(model, splits['train'], cfg, device)
        loss = estimate_loss(model, splits, cfg.eval_iters, cfg.batch_size, cfg.block_size,
                             cfg.seed, device)
        text = sample(model, tokenizer, 100, cfg.block_size, cfg.seed, device).replace('\n', ' / ')
        n_params = sum(p.numel() for p in model.parameters())
        lr = cfg.learning_rate or model.learning_rate
        print(f"| {name} | {n_params:,} | {lr:g} | {loss['train']:.4f} | {loss['val']:.4f} | "
              f"{time.time() - t0:.0f} | `{text}` |", flush=True)


if __name__ == '__main__':
    cli(main, LadderConfig)
