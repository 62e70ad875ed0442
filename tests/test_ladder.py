"""learn/ladder.py: every rung is causal and starts at ln(vocab); the top rung is model.GPT."""

import math

import pytest
import torch

from conftest import run_script
from learn.ladder import RUNGS, LadderConfig, build, main
from model import GPT, GPTConfig
from nanogpt.errors import UserError

V = 65  # tiny Shakespeare's characters
TINY = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def scrambled(rung, std=0.3):
    """A tiny rung in eval mode with weights far from their init, so that any leak shows."""
    model = build(rung, LadderConfig(**TINY), V).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def earlier_and_later_change(model, t=9):
    """How much the logits before and after position t move when only the token at t changes."""
    idx = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % V
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    return (a[:, :t] - b[:, :t]).abs().max().item(), (a[:, t:] - b[:, t:]).abs().max().item()


@pytest.mark.parametrize('rung', RUNGS)
def test_rung_is_causal(rung):
    earlier, later = earlier_and_later_change(scrambled(rung))
    assert earlier == 0.0  # no logit before t reads the token at t
    assert later > 1e-3  # the token at t is read: at t itself (every rung), later too (attention)


def test_causality_check_catches_a_peek_at_the_future(monkeypatch):
    # attention over all positions, masks off: the check above must see the leak
    monkeypatch.setattr(RUNGS['heads'], 'attention_weights',
                        lambda self, q, k: torch.softmax(q @ k.transpose(-2, -1), dim=-1))
    earlier, _ = earlier_and_later_change(scrambled('heads'))
    assert earlier > 1e-3


@pytest.mark.parametrize('rung', RUNGS)
def test_loss_at_init_is_a_uniform_guess(rung):
    idx = torch.randint(V, (8, 17), generator=torch.Generator().manual_seed(1))
    _, loss = build(rung, LadderConfig(**TINY), V)(idx[:, :-1], idx[:, 1:])
    assert loss.item() == pytest.approx(math.log(V), abs=0.03)  # ln 65 = 4.174


def test_top_rung_is_our_gpt():
    rung = scrambled('dropout', std=0.05)
    gpt = GPT(GPTConfig(vocab_size=V, bias=False, **TINY)).eval()
    gpt.load_state_dict(rung.state_dict())  # strict: the same parameter names and shapes
    idx = torch.randint(V, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, loss = rung(idx, idx)
        gpt_logits, gpt_loss = gpt(idx, idx)  # with targets: the logits of every position
    torch.testing.assert_close(logits, gpt_logits, atol=1e-6, rtol=0)
    assert loss.item() == pytest.approx(gpt_loss.item(), abs=1e-6)


def test_top_rung_starts_as_our_gpt_starts():
    # GPT-2's init: N(0, 0.02), projections into the residual stream N(0, 0.02 / sqrt(2 * n_layer)),
    # LayerNorm gains 1
    shape = dict(block_size=32, n_layer=2, n_head=2, n_embd=64)
    rung = build('dropout', LadderConfig(**shape), V).state_dict()
    gpt = GPT(GPTConfig(vocab_size=V, bias=False, **shape)).state_dict()
    for name, p in gpt.items():
        assert rung[name].std().item() == pytest.approx(p.std().item(), rel=0.1), name
    assert rung['transformer.h.1.mlp.c_proj.weight'].std().item() == pytest.approx(0.01, rel=0.1)


def test_each_rung_adds_parameters_to_the_one_below():
    sizes = [sum(p.numel() for p in build(r, LadderConfig(**TINY), V).parameters()) for r in RUNGS]
    # head < heads (W^O) < mlp < residual (n_layer blocks) < layernorm (gains) = dropout (none)
    assert sizes[1] < sizes[2] < sizes[3] < sizes[4] < sizes[5] == sizes[6]


def test_ladder_prints_a_row_per_rung(char_data, capsys):
    main(LadderConfig(rungs='bigram,dropout', data_dir=char_data, max_iters=30, warmup_iters=5,
                      eval_iters=2, device='cpu', **TINY))
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(' | ') for line in lines if line.startswith('| ')]
    assert [r[0] for r in rows] == ['| rung', '| ---', '| bigram', '| dropout']
    val = [float(r[4]) for r in rows[2:]]
    assert all(v < math.log(V) for v in val)  # 30 steps already learn the characters' frequencies


def test_unknown_rung_names_the_rungs():
    with pytest.raises(UserError, match="unknown rung 'transformer'.*bigram, head, heads"):
        main(LadderConfig(rungs='bigram,transformer'))


def test_missing_data_says_how_to_prepare_it(tmp_path):
    with pytest.raises(UserError, match=r'python data/shakespeare_char/prepare.py'):
        main(LadderConfig(data_dir=str(tmp_path), device='cpu'))


@pytest.mark.slow
def test_ladder_runs_from_the_command_line(char_data):
    r = run_script('learn/ladder.py', f'--data_dir={char_data}', '--rungs=head,residual',
                   '--max_iters=10', '--warmup_iters=2', '--eval_iters=1', '--n_layer=1',
                   '--n_embd=32', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert '| head |' in r.stdout and '| residual |' in r.stdout
