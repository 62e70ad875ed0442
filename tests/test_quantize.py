"""Weight-only int8 (quantize.py): each output within the per-channel rounding bound of the fp32
Linear's, a copy that leaves the model alone, the embedding kept in fp32, and decoding that runs
eagerly and compiled to the same tokens."""

import pytest
import torch

from conftest import tiny_gpt
from nanogpt.generation import RowKVCache, compile_decode, decode_step, generate
from nanogpt.quantize import Int8Linear, quantize_int8


def test_int8_linear_is_within_half_a_step_per_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24)
    q = Int8Linear(linear, torch.float32)  # bf16 inputs would add their own rounding
    assert q.weight.dtype == torch.int8 and q.scale.shape == (24,)
    # each row's largest weight is +-127 steps: exact
    assert (q.weight.abs().amax(dim=1) == 127).all()
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        err = (q(x) - linear(x)).abs()  # (3, 5, 24)
        # |sum_i x_i (w_i - s q_i)| <= sum_i |x_i| * s / 2
        bound = x.abs().sum(-1, keepdim=True) * q.scale / 2
    assert (err <= bound + 1e-5).all() and err.max() > 0


def test_quantize_int8_copies_and_keeps_the_embedding():
    model = tiny_gpt(3.0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_int8(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.transformer.h[0].mlp.c_fc, Int8Linear)
    # the tied embedding stays the fp32 table; the head reads its int8 rows
    assert torch.equal(q.transformer.wte.weight, model.transformer.wte.weight)
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        a, b = model(idx)[0], q(idx)[0]
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.slow
def test_an_int8_model_decodes_compiled_as_eagerly_to_bf16_rounding():
    # the compiled step multiplies by the int8 weights in Inductor's own kernel, which does not
    # round its outputs to bf16 as aten._weight_int8pack_mm does: logits agree to bf16's rounding
    # (under 1% of the largest logit here) at every position, not bit for bit
    q = quantize_int8(tiny_gpt(3.0, block_size=32)).eval()
    step = compile_decode(q, 'cpu', sample=False)
    static, rows = RowKVCache(q, 2, static=True), RowKVCache(q, 2)
    with torch.no_grad():
        for t in range(30):
            x = torch.tensor([[t % 65], [(7 * t) % 65]])
            a, b = step(static, x), decode_step(q, rows, x)
            assert (a - b).abs().max() < 0.015 * b.abs().max(), t
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    compiled = generate(q, idx, 40, temperature=0.0, step=compile_decode(q, 'cpu'))
    assert torch.equal(compiled[:, :30], generate(q, idx, 27, temperature=0.0))
