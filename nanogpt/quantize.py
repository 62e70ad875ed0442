"""
Weight-only int8 for decoding: each Linear's weight stored as int8 with one scale per output
channel (symmetric, absmax / 127, as gpt-fast's int8 mode), multiplied in bf16, outputs in the
inputs' dtype. A decode step reads every weight once, so a quarter of fp32's bytes (half of bf16's)
is what bounds it; PyTorch's CPU kernel (aten._weight_int8pack_mm) multiplies by the int8 weights
as it reads them.

    model = quantize_int8(model)  # a copy; the embeddings and norms stay as they were (fp32)
"""

import copy

import torch
import torch.nn as nn


class Int8Linear(nn.Module):
    """A Linear's weight (out, in) as int8 q with per-channel scales s (out,): w ~= s[:, None] * q,
    each row's largest weight exact, every weight within s / 2 of its own value."""

    def __init__(self, linear, dtype=torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer('weight', (w / scale[:, None]).round().to(torch.int8))
        # the kernel multiplies in the inputs' dtype, and its scales must be in it: bf16 by
        # default, as the bf16 decode path (its fp32 path was 4-10x slower here, docs/sampling.md)
        self.register_buffer('scale', scale.to(dtype))
        self.bias = linear.bias

    def forward(self, x):
        # the kernel takes 2-D inputs: (..., in) -> (N, in) -> (N, out) -> (..., out), in x's dtype
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.size(-1)).to(self.scale.dtype),
                                               self.weight, self.scale).to(x.dtype)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def quantize_int8(model, dtype=torch.bfloat16):
    """A copy of model whose Linears (the blocks' and the head) are Int8Linear, multiplying in
    dtype. A head tied to the token embedding is untied: the embedding keeps its fp32 table, the
    head reads int8 rows."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child, dtype))
    return model
