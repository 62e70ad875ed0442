"""The engine's prefill and decode machinery: a burst of rows is prefilled in one padded forward
that changes no row's text nor its prompt's log-probabilities, and the compiled decode step (rows
padded up to a bucket) decodes what the eager one decodes."""

import pytest
import torch
from torch.nn import functional as F

from conftest import tiny_gpt
from nanogpt.engine import Engine, Row
from nanogpt.generation import generate
from nanogpt.tokenizer import Tokenizer
from test_serve import run_engine

TOKENIZER = Tokenizer({'kind': 'char', 'chars': ''.join(chr(65 + i) for i in range(65))})
# 1 to 18 tokens: a single token (nothing to prefill), and one past block_size 16 (cropped)
PROMPTS = [[1, 2, 3], [5], list(range(7, 25)), [4, 4, 4, 4, 4, 4, 4], [9, 9]]


def burst(n_tokens=30):
    """One row per prompt, greedy and seeded ones, with the prompt's log-probabilities asked for."""
    return [Row(p, n_tokens, None, temperature=0 if j % 2 == 0 else 0.9, seed=5 + j, echo=True,
                logprobs=2) for j, p in enumerate(PROMPTS)]


def alone(model, row, n_tokens):
    return generate(model, torch.tensor([row.prompt]), n_tokens, temperature=row.temperature,
                    seeds=torch.tensor([row.seed]))[0, len(row.prompt):].tolist()


def counting_prefills(model):
    """Wrap model.forward to count the forwards of more than one token (prefills)."""
    calls, forward = [], model.forward

    def counted(idx, *args, **kwargs):
        if idx.size(1) > 1:
            calls.append(idx.size(0))
        return forward(idx, *args, **kwargs)
    model.forward = counted
    return calls


def test_a_burst_is_prefilled_in_one_forward_and_each_row_gets_its_text_alone():
    model = tiny_gpt(weight_scale=3).eval()
    calls = counting_prefills(model)
    rows = burst()
    events = run_engine(Engine(model, TOKENIZER, max_rows=8), [rows])
    # all five prompts at once (18 tokens is past block_size: that row is refilled later, alone)
    assert calls[0] == 5 and all(c == 1 for c in calls[1:])
    for row in rows:
        evs = events[id(row)]
        assert [e['token'] for e in evs[1:]] == alone(model, row, 30)
        # the echo: the prompt (cropped to block_size) scored as a full forward scores it
        # (serve.py takes no echo of a prompt longer than block_size)
        prompt = row.prompt[-16:]
        echo = evs[0]['echo']
        assert [t for t, _, _ in echo[1:]] == prompt[1:] and echo[0][1] is None
        if len(prompt) > 1:
            x = torch.tensor([prompt])
            with torch.no_grad():
                logp = F.log_softmax(model(x, targets=x)[0][0], dim=-1)  # (T, vocab)
            for t, (token, lp, _) in enumerate(echo[1:]):
                assert abs(lp - logp[t, token].item()) < 1e-5


@pytest.mark.slow
def test_the_compiled_engine_decodes_what_the_eager_engine_decodes():
    model = tiny_gpt(weight_scale=3).eval()
    torch.compiler.reset()
    engine = Engine(model, TOKENIZER, max_rows=5, compile=True)
    assert engine.buckets == [1, 4, 5]
    logs = []
    engine.warm_up(log=logs.append)  # compiles every bucket up front, shown as progress
    assert len(logs) == 3 and logs[0].startswith('compiled the decode step for 1 rows')
    rows = burst(40)  # 5 rows, then 4, 1 as they finish... all through the buckets
    rows[1].max_tokens, rows[3].max_tokens = 10, 25
    events = run_engine(engine, [rows[:1], rows[1:]])
    for row in rows:
        assert [e['token'] for e in events[id(row)][1:]] == alone(model, row, row.max_tokens)
