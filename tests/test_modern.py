"""The modern options (rotary, RMSNorm, QK-norm, ReLU², untied head, no bias) and Muon."""

import pytest
import torch

from conftest import same_weights, tiny_gpt, tiny_train_config
from model import GPTConfig, apply_rotary, rotary_tables
from nanogpt.checkpoint import load_checkpoint, model_from_checkpoint
from nanogpt.optimizers import ChainedOptimizer, Muon, configure_optimizers
from train import TrainConfig, main

ALL = dict(rotary=True, rmsnorm=True, qk_norm=True, relu2=True, tie_weights=False, bias=False)
SWITCHES = [dict(rotary=True), dict(rmsnorm=True), dict(qk_norm=True), dict(relu2=True),
            dict(tie_weights=False), dict(bias=False), ALL]





@pytest.mark.parametrize('switches', SWITCHES, ids=lambda s: '+'.join(s))
def test_each_switch_keeps_the_model_causal(switches):
    model = tiny_gpt(**switches).eval()
    idx = torch.randint(0, 65, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 65
    logits_a, _ = model(idx, targets=idx)
    logits_b, _ = model(changed, targets=idx)
    torch.testing.assert_close(logits_a[:, :10], logits_b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(logits_a[:, 10:], logits_b[:, 10:])


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
@pytest.mark.parametrize('switches', SWITCHES, ids=lambda s: '+'.join(s))
def test_each_switch_trains_with_each_optimizer(switches, optimizer):
    # memorise one batch of 4 sequences: 40 steps take the loss well below ln(65) = 4.17
    model = tiny_gpt(**switches)
    cfg = TrainConfig(weight_decay=0.0, learning_rate=3e-3, optimizer=optimizer)
    opt = configure_optimizers(model, cfg, 'cpu')
    idx = torch.randint(0, 65, (4, 17), generator=torch.Generator().manual_seed(1))
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    losses = []
    for _ in range(40):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(4.17, abs=0.1) and losses[-1] < 2.5


def test_switches_change_the_parameters_as_documented():
    # positions come from the rotation
    assert 'transformer.wpe.weight' not in tiny_gpt(rotary=True).state_dict()
    assert not any(k.endswith('bias') for k in tiny_gpt(bias=False).state_dict())
    untied = tiny_gpt(tie_weights=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert isinstance(tiny_gpt(rmsnorm=True).transformer.h[0].ln_1, torch.nn.RMSNorm)
    assert GPTConfig().is_gpt2() and not GPTConfig(rotary=True).is_gpt2()


def test_rotary_attention_scores_depend_only_on_relative_position():
    hs, T, shift = 16, 8, 5
    cos, sin = rotary_tables(T + shift, hs)
    q, k = torch.randn(1, 1, T, hs), torch.randn(1, 1, T, hs)

    def scores(start):  # of q and k at positions start, start + 1, ...
        cos_, sin_ = cos[start:start + T], sin[start:start + T]
        return apply_rotary(q, cos_, sin_) @ apply_rotary(k, cos_, sin_).transpose(-1, -2)
    # every position moved by 5: the same scores
    torch.testing.assert_close(scores(0), scores(shift), rtol=1e-4, atol=1e-4)
    # position 0 is not rotated, and a rotation keeps each vector's length
    torch.testing.assert_close(apply_rotary(q, cos[:T], sin[:T])[..., 0, :], q[..., 0, :])
    torch.testing.assert_close(apply_rotary(q, cos[:T], sin[:T]).norm(dim=-1), q.norm(dim=-1))


def test_muon_update_of_a_matrix_is_close_to_orthogonal():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(64, 32))
    opt = Muon([w], lr=1.0, weight_decay=0.0, momentum=0.0)
    # a badly conditioned gradient
    w.grad = torch.randn(64, 1) @ torch.randn(1, 32) + 0.1 * torch.randn(64, 32)
    opt.step()
    # undo the sqrt(rows/cols) lr adjustment
    s = torch.linalg.svdvals(-w.detach() / (64 / 32) ** 0.5)
    # Newton-Schulz's quintic with Jordan's coefficients lands singular values in about [0.7, 1.2]
    assert s.min() > 0.6 and s.max() < 1.25
    grad_s = torch.linalg.svdvals(w.grad)
    assert grad_s.max() / grad_s.min() > 50  # the gradient was not


def test_our_muon_steps_as_torch_optim_muon_does():
    # the same algorithm; torch's runs Newton-Schulz in bf16, ours in fp32 on CPU: close, not equal
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(48, 32)), torch.nn.Parameter(torch.randn(48, 32))
    b.data.copy_(a.data)
    ours = Muon([a], lr=0.02, weight_decay=0.1, momentum=0.95)
    ref = torch.optim.Muon([b], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    for _ in range(3):
        g = torch.randn(48, 32)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    # bf16 rounding of the updates, ~0.02 * 1e-2
    torch.testing.assert_close(a.data, b.data, rtol=0, atol=2e-3)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_gpt(tie_weights=False, bias=False)
    cfg = TrainConfig(learning_rate=1e-3, optimizer='muon', muon_lr=0.02)
    opt = configure_optimizers(model, cfg, 'cpu')
    muon, adamw = opt.optimizers
    assert isinstance(opt, ChainedOptimizer) and isinstance(muon, Muon)
    muon_params = {id(p) for g in muon.param_groups for p in g['params']}
    expected = {id(p) for n, p in model.named_parameters()
                if n.startswith('transformer.h.') and p.dim() == 2}
    # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert muon_params == expected and len(expected) == 2 * 4
    adamw_params = {id(p) for g in adamw.param_groups for p in g['params']}
    assert id(model.lm_head.weight) in adamw_params
    assert id(model.transformer.wte.weight) in adamw_params
    assert not adamw_params & muon_params
    assert len(adamw_params | muon_params) == len(list(model.parameters()))
    assert muon.param_groups[0]['lr_scale'] == pytest.approx(20)  # muon_lr / learning_rate


MUON = TrainConfig(learning_rate=1e-3, optimizer='muon')


def test_chained_optimizer_state_round_trips_through_a_safe_load(tmp_path):
    model = tiny_gpt()
    opt = configure_optimizers(model, MUON, 'cpu')
    _, loss = model(torch.zeros(1, 16, dtype=torch.long), torch.ones(1, 16, dtype=torch.long))
    loss.backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / 'opt.pt')
    fresh = configure_optimizers(tiny_gpt(), MUON, 'cpu')
    fresh.load_state_dict(torch.load(tmp_path / 'opt.pt', weights_only=True))
    a, b = opt.optimizers[0].state_dict()['state'], fresh.optimizers[0].state_dict()['state']
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k]['momentum_buffer'], b[k]['momentum_buffer']) for k in a)


MODERN = dict(ALL, optimizer='muon', muon_lr=0.02)


def test_a_modern_muon_run_resumes_exactly_and_its_checkpoint_rebuilds_the_model(tmp_path,
                                                                                 char_data):
    overrides = dict(MODERN, max_iters=12, eval_interval=6)
    full = main(tiny_train_config(tmp_path / 'full', char_data, **overrides))
    main(tiny_train_config(tmp_path / 'split', char_data, **{**overrides, 'max_iters': 6}))
    main(tiny_train_config(tmp_path / 'split', char_data, **overrides, init_from='resume'))
    # weights_only=True: Muon's state is plain tensors
    a = load_checkpoint(tmp_path / 'full' / 'ckpt.pt')
    b = load_checkpoint(tmp_path / 'split' / 'ckpt.pt')
    assert same_weights(a['model'], b['model'])
    assert full['losses']['val'] < 4.0  # below ln(65): it learnt something in 12 steps
    # the rebuilt model has the switches and the weights the run trained
    model = model_from_checkpoint(a)
    assert (model.config.rotary, model.config.tie_weights) == (True, False)
    assert same_weights(model.state_dict(), a['model'])
