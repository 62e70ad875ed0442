"""Generation: the KV cache computes what a full forward pass computes, batches sample each row as
it would be sampled alone, and top_k / top_p / stop do what they say."""

import pytest
import torch

from conftest import tiny_gpt
from nanogpt.generation import KVCache, generate, sample_next

# weights 3x GPT-2's init: logits up to ~4, peakier than the near-uniform ones at init
PEAKY = 3.0


def gen(seed):
    return torch.Generator().manual_seed(seed)


MODERN = dict(rotary=True, qk_norm=True, rmsnorm=True, relu2=True, bias=False)


@pytest.mark.parametrize('modern', [{}, MODERN])
@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_cached_and_uncached_generation_are_identical_within_block_size(temperature, modern):
    # with rotary, the cached keys carry their positions' rotation
    model = tiny_gpt(PEAKY, **modern).eval()
    idx = torch.randint(0, 65, (3, 5), generator=gen(1))
    # 16 tokens: all of block_size
    cached = generate(model, idx, 11, temperature=temperature, generator=gen(2))
    uncached = generate(model, idx, 11, temperature=temperature, generator=gen(2),
                        use_cache=False)
    assert cached.shape == (3, 16) and torch.equal(cached, uncached)


@pytest.mark.parametrize('prompt_len, keep', [(3, None), (20, 5), (3, 16)])
def test_cached_logits_equal_a_full_forward_over_the_context_the_cache_holds(prompt_len, keep):
    """At every step, also after the cache has filled up and been refilled (block_size 16, 50 new
    tokens), and for a prompt longer than block_size."""
    model = tiny_gpt(PEAKY).eval()
    block_size, n_new = 16, 50
    step_logits = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: step_logits.append(out[:, -1]))
    idx = torch.randint(0, 65, (2, prompt_len), generator=gen(1))
    seq = generate(model, idx, n_new, temperature=1.0, keep=keep, generator=gen(2))
    hook.remove()
    assert len(step_logits) == n_new and seq.shape == (2, prompt_len + n_new)

    # the documented policy: the last block_size tokens of the prompt, then, whenever the window
    # would exceed block_size, the last `keep` tokens (block_size // 2 by default)
    keep = keep or block_size // 2
    start = max(0, prompt_len - block_size)
    # the logits of step predict seq[:, n]
    for step, n in enumerate(range(prompt_len, prompt_len + n_new)):
        if n - start > block_size:
            start = n - keep
        with torch.no_grad():
            full, _ = model(seq[:, start:n])
        assert (step_logits[step] - full[:, -1]).abs().max().item() < 1e-4, \
            f"step {step}, context {start}:{n}"


def test_keep_block_size_is_the_classic_sliding_window():
    model = tiny_gpt(PEAKY).eval()
    idx = torch.randint(0, 65, (2, 4), generator=gen(1))
    cached = generate(model, idx, 40, temperature=1.0, keep=16, generator=gen(2))
    uncached = generate(model, idx, 40, temperature=1.0, use_cache=False, generator=gen(2))
    assert torch.equal(cached, uncached)


def test_a_batch_samples_each_row_as_it_would_be_sampled_alone():
    model = tiny_gpt(PEAKY).eval()
    idx = torch.randint(0, 65, (3, 4), generator=gen(1))
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    # past block_size: refills too
    batch = generate(model, idx, 40, seeds=torch.tensor([10, 11, 12]), **kw)
    for i in range(3):
        alone = generate(model, idx[i:i + 1], 40, seeds=torch.tensor([10 + i]), **kw)
        assert torch.equal(batch[i:i + 1], alone)
    assert not torch.equal(batch[0, 4:], batch[1, 4:])  # the rows did draw different numbers


def test_greedy_picks_the_most_likely_token():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 1.9]])
    assert sample_next(logits, temperature=0.0).tolist() == [1, 0]


def draws(probs, n=4000, **kw):
    """n tokens drawn from the distribution probs, as sample_next would for n identical rows."""
    logits = torch.tensor(probs).log().expand(n, -1)
    return sample_next(logits, generator=gen(0), **kw)


@pytest.mark.parametrize('step', [0, 7])
def test_per_row_streams_sample_the_distribution(step):
    # n rows with seeds 0..n-1 at one step draw n independent numbers: the frequencies follow
    # the probabilities, and a token of probability 0 (top_k's cut) is never drawn
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log().expand(20000, -1)
    tokens = sample_next(logits, seeds=torch.arange(20000), step=step)
    freq = torch.bincount(tokens, minlength=5) / 20000
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    top2 = sample_next(logits, top_k=2, seeds=torch.arange(20000), step=step)
    assert set(top2.tolist()) == {0, 1}


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    probs = [0.5, 0.3, 0.1, 0.06, 0.04]
    assert set(draws(probs).tolist()) == {0, 1, 2, 3, 4}
    assert set(draws(probs, top_k=2).tolist()) == {0, 1}
    # top_p keeps the fewest most likely tokens holding top_p:
    # 0.5 + 0.3 >= 0.75, but 0.5 + 0.3 < 0.85
    assert set(draws(probs, top_p=0.75).tolist()) == {0, 1}
    assert set(draws(probs, top_p=0.85).tolist()) == {0, 1, 2}
    assert set(draws(probs, top_p=0.1).tolist()) == {0}  # the most likely token is always kept
    assert set(draws(probs, top_k=2, top_p=0.5).tolist()) == {0}
    # what is kept is renormalised: 0.5, 0.3, 0.1 out of 0.9
    freq = torch.bincount(draws(probs, top_p=0.85), minlength=5) / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.1, 0, 0]) / 0.9, atol=0.03)


def test_stop_tokens_end_each_row_and_then_the_stream():
    model = tiny_gpt(PEAKY).eval()
    idx = torch.randint(0, 65, (2, 3), generator=gen(1))
    greedy = generate(model, idx, 30, temperature=0.0)[:, 3:].tolist()
    stop = [greedy[0][6], greedy[1][2]]
    # the index of each row's first stop token
    ends = [next(j for j, t in enumerate(row) if t in stop) for row in greedy]
    length = max(ends) + 1
    out = generate(model, idx, 30, temperature=0.0, stop=stop)[:, 3:].tolist()
    for row, g, end in zip(out, greedy, ends):
        # the row as without stop up to its stop token, which it then repeats until every row has
        # ended
        assert row == g[:end + 1] + [g[end]] * (length - end - 1)
    one = generate(model, idx[:1], 30, temperature=0.0, stop=greedy[0][4])[:, 3:].tolist()[0]
    assert one == greedy[0][:greedy[0].index(greedy[0][4]) + 1]  # a single id works too


def test_the_cache_takes_a_prefill_only_when_empty():
    model = tiny_gpt(PEAKY).eval()
    cache = KVCache(model, 1)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        assert cache.pos == 4
        with pytest.raises(ValueError, match='empty KVCache'):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        for _ in range(12):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match='block_size'):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_the_cache_holds_the_weights_dtype_also_under_autocast():
    # decode steps attend in it: CPU bf16 attention kernels are slower than fp32 ones
    model = tiny_gpt(PEAKY).eval()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert KVCache(model, 1).k[0].dtype == torch.float32
    assert KVCache(model.to(torch.bfloat16), 1).k[0].dtype == torch.bfloat16


def test_under_bf16_autocast_prefills_run_in_fp32_and_decode_steps_in_bf16():
    """A prefill multiplies matrices (slow in bf16 on CPUs without bf16 units), a decode step
    vectors."""
    model = tiny_gpt(PEAKY).eval()
    step_logits = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: step_logits.append(out[:, -1]))
    idx = torch.randint(0, 65, (2, 5), generator=gen(1))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        # 25 > block_size 16: one refill
        seq = generate(model, idx, 20, temperature=1.0, generator=gen(2))
    hook.remove()
    assert [logits.dtype for logits in step_logits] == (
        [torch.float32] + [torch.bfloat16] * 11 + [torch.float32] + [torch.bfloat16] * 7)
    with torch.no_grad():
        # the prompt's prefill: exactly fp32
        assert torch.equal(step_logits[0], model(idx)[0][:, -1])
        # 17 tokens, the cache full: a refill of the last keep = 8
        refill, _ = model(seq[:, 17 - 8:17])
        assert (step_logits[12] - refill[:, -1]).abs().max().item() < 1e-5
        # decode steps in bf16 stay close to fp32 (bf16 keeps ~3 significant digits)
        assert (step_logits[1] - model(seq[:, :6])[0][:, -1]).abs().max().item() < 0.1
