"""
LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): finetune a big model by
training, beside each chosen frozen weight W (out, in), a low-rank update B A, with A (r, in) and
B (out, r), r small:
    h = W x + (alpha / r) * B A x                                        (the paper's eq. 3)
B starts at zero, so the model at step 0 computes exactly the base model; only A and B train, so
the optimizer holds state for r * (in + out) numbers per matrix instead of in * out. After training,
W + (alpha / r) B A is a plain weight again (merge_lora): sampling, evaluation and export see an
ordinary GPT.

train.py: lora_rank > 0 turns it on; lora_targets names the Linears of each block it adapts.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt.errors import UserError

# the Linears of a block, by their names in model.py: q, k and v (one fused matrix), attention's
# output, and the MLP's two
TARGETS = ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')


class LoRALinear(nn.Linear):
    """A Linear whose weight (and bias) are frozen, plus a trainable low-rank update. It keeps
    nn.Linear's weight and bias names, so a checkpoint's base weights keep their keys and only
    lora_A and lora_B are added beside them."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device='meta')
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = alpha / rank  # so that changing r hardly needs a new learning rate
        # A as nn.Linear's own init (Kaiming uniform), B zero: B A = 0 at step 0 (Hu et al. 4.1)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank,
                                               device=base.weight.device))
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        # (B, T, in) -> (B, T, r) -> (B, T, out): two thin matmuls, never the (out, in) product
        return (F.linear(x, self.weight, self.bias)
                + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling)

    def merged(self):
        """The plain Linear computing the same function: W + scaling * B A."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device='meta')
        with torch.no_grad():
            linear.weight = nn.Parameter(self.weight + self.scaling * self.lora_B @ self.lora_A)
        linear.bias = self.bias
        return linear


def parse_targets(targets):
    """'attn.c_attn,mlp.c_fc' -> the tuple of names, checked; 'all': every Linear of a block."""
    names = TARGETS if targets == 'all' else tuple(t.strip() for t in targets.split(',') if t)
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"lora_targets {targets!r}: each must be one of {', '.join(TARGETS)} "
                         "(comma-separated), or 'all'")
    return names


def linears(model, names):
    """(module, attribute) of each named Linear of each block: 'attn.c_attn' is
    block.attn.c_attn."""
    for block in model.transformer.h:
        for name in names:
            parent, attr = name.split('.')
            yield getattr(block, parent), attr


def apply_lora(model, rank, alpha, dropout=0.0, targets='attn.c_attn,attn.c_proj'):
    """Freeze every parameter of the GPT `model` and put a LoRALinear in place of each target
    Linear of each block, in place. Afterwards model.parameters() that require grad are exactly
    the adapters. A rank above min(in, out) of a target is refused: B A of that rank is already
    any (out, in) update, so more rank adapts nothing more, at more cost."""
    targets = list(linears(model, parse_targets(targets)))
    full = min(min(getattr(m, a).in_features, getattr(m, a).out_features) for m, a in targets)
    if rank > full:
        raise UserError(f"lora_rank {rank} is more than {full}, the smaller side of the matrices "
                        f"it adapts: rank {full} already allows any update; give lora_rank <= "
                        f"{full} (or lora_rank=0 to train every weight)")
    for p in model.parameters():
        p.requires_grad_(False)
    for module, attr in targets:
        setattr(module, attr, LoRALinear(getattr(module, attr), rank, alpha, dropout))
    return model


def merge_lora(model):
    """Fold every adapter into its weight, in place: a plain GPT again, with the same outputs."""
    for module, attr in linears(model, TARGETS):
        if isinstance(getattr(module, attr), LoRALinear):
            setattr(module, attr, getattr(module, attr).merged())
    return model


def lora_args(cfg):
    """apply_lora's arguments for a run's config; None without LoRA."""
    if not getattr(cfg, 'lora_rank', 0):
        return None
    return {'rank': cfg.lora_rank, 'alpha': cfg.lora_alpha, 'dropout': cfg.lora_dropout,
            'targets': cfg.lora_targets}
