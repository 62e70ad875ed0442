"""The network: GPT-2's architecture, initialisation and sizes."""

import math

import pytest
import torch

from conftest import tiny_gpt
from model import GPT, GPTConfig
from nanogpt.optimizers import configure_optimizers
from train import TrainConfig


def test_gpt2_124m_has_124m_parameters():
    with torch.device('meta'):  # shapes only, no memory
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                              bias=True))
    assert model.get_num_params(non_embedding=False) == 124_439_808
    assert model.get_num_params() == 124_439_808 - 1024 * 768  # position embedding left out


def test_model_is_causal():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 65, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 65
    logits_a, _ = model(idx, targets=idx)
    logits_b, _ = model(changed, targets=idx)
    # earlier positions can't see position 10
    assert torch.equal(logits_a[:, :10], logits_b[:, :10])
    assert not torch.allclose(logits_a[:, 10:], logits_b[:, 10:])


def test_loss_at_init_is_close_to_uniform():
    model = tiny_gpt(n_layer=4)
    idx = torch.randint(0, 65, (8, 16))
    _, loss = model(idx, targets=torch.roll(idx, -1, 1))
    assert abs(loss.item() - math.log(65)) < 0.05  # logits ~ 0 at init: every token ~ 1/V


def test_init_follows_gpt2():
    model = tiny_gpt(n_layer=6, n_embd=256, n_head=4, vocab_size=1000)
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    residual_std = 0.02 / math.sqrt(2 * 6)
    for block in model.transformer.h:
        assert abs(block.attn.c_proj.weight.std().item() - residual_std) < 0.0005
        assert abs(block.mlp.c_proj.weight.std().item() - residual_std) < 0.0005
        assert torch.all(block.attn.c_attn.bias == 0)


def test_lm_head_is_tied_to_token_embedding():
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_without_targets_only_the_last_position_is_returned():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 65, (3, 16))
    logits, loss = model(idx)
    full, _ = model(idx, targets=idx)
    assert loss is None and logits.shape == (3, 1, 65)
    torch.testing.assert_close(logits[:, 0], full[:, -1])


def test_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match='block_size'):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))


def test_crop_block_size_keeps_the_first_positions():
    model = tiny_gpt()
    wpe = model.transformer.wpe.weight[:8].clone()
    model.crop_block_size(8)
    assert model.config.block_size == 8 and torch.equal(model.transformer.wpe.weight, wpe)
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError):
        model.crop_block_size(9)


def test_weight_decay_only_on_matrices_and_embeddings():
    model = tiny_gpt()
    opt = configure_optimizers(model, TrainConfig(weight_decay=0.1), 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() == 2 for p in decay['params'])
    assert all(p.dim() == 1 for p in no_decay['params'])
    n = sum(p.numel() for g in opt.param_groups for p in g['params'])
    # every parameter once, the tied one too
    assert n == model.get_num_params(non_embedding=False)


def test_plain_generate_is_greedy_at_temperature_0_and_with_top_k_1():
    model = tiny_gpt(weight_scale=3.0).eval()  # peaky logits, yet sampling among all tokens differs
    idx = torch.randint(0, 65, (2, 4))
    a = model.generate(idx, 30, temperature=0.0)  # runs past block_size=16: the context is cropped
    assert a.shape == (2, 34) and torch.equal(a[:, :4], idx)
    with torch.no_grad():
        for t in range(4, 34):  # each new token is the argmax over the last block_size tokens
            logits, _ = model(a[:, max(0, t - 16):t])
            assert torch.equal(a[:, t], logits[:, -1].argmax(-1))
    assert torch.equal(model.generate(idx, 30, temperature=1.0, top_k=1), a)  # only the argmax left
    assert not torch.equal(model.generate(idx, 30, temperature=1.0), a)



def test_a_batch_whose_targets_are_all_ignored_has_loss_zero_and_no_gradient():
    # a chat window with no assistant token in it: 0, not the mean of nothing (nan)
    model = tiny_gpt()
    idx = torch.randint(0, 65, (2, 16))
    _, loss = model(idx, torch.full_like(idx, -1))
    loss.backward()
    assert loss.item() == 0.0
    assert all((p.grad == 0).all() for p in model.parameters())
    # and with some targets kept, the mean over those alone, as F.cross_entropy computes it
    targets = idx.clone()
    targets[:, :8] = -1
    logits, loss = model(idx, targets)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(
        model(idx, idx)[0][:, 8:].reshape(-1, 65), idx[:, 8:].reshape(-1)).item(), abs=1e-6)
