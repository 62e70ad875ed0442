"""The compiled decode step (generation.compile_decode over a static RowKVCache) decodes exactly
what the eager step decodes: the same greedy tokens in fp32 over 500 tokens (with refills of the
cache along the way), the same sampled tokens for the same seeds, for GPT-2's blocks and the
modern switches. Compiling takes seconds, so these are slow tests."""

import re

import pytest
import torch

from conftest import tiny_gpt
from nanogpt.generation import RowKVCache, compile_decode, decode_step, generate

pytestmark = pytest.mark.slow

PEAKY = 3.0  # weights 3x GPT-2's init: logits up to ~4, so greedy picks are not near-ties
MODERN = dict(rotary=True, qk_norm=True, rmsnorm=True, relu2=True, bias=False)


@pytest.mark.parametrize('modern', [{}, MODERN])
def test_compiled_greedy_equals_eager_for_500_tokens(modern):
    model = tiny_gpt(PEAKY, block_size=32, **modern).eval()
    idx = torch.randint(0, 65, (2, 7), generator=torch.Generator().manual_seed(1))
    # 500 tokens through a 32-position cache: 30 refills of its last 16 tokens on the way
    eager = generate(model, idx, 500, temperature=0.0)
    compiled = generate(model, idx, 500, temperature=0.0, step=compile_decode(model, 'cpu'))
    assert compiled.shape == (2, 507) and torch.equal(compiled, eager)
    # and the text is not one token repeated (which any step would agree on)
    assert len(set(eager[0, 7:].tolist())) > 5


def test_compiled_sampling_equals_eager_for_the_same_seeds():
    model = tiny_gpt(PEAKY, block_size=32).eval()
    idx = torch.randint(0, 65, (3, 4), generator=torch.Generator().manual_seed(2))
    seeds = torch.tensor([5, 6, 7])
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, seeds=seeds)
    eager = generate(model, idx, 200, **kw)
    compiled = generate(model, idx, 200, step=compile_decode(model, 'cpu'), **kw)
    assert torch.equal(compiled, eager)
    assert not torch.equal(compiled[0], compiled[1])  # the rows draw on streams of their own


def test_a_static_cache_step_equals_the_eager_step_at_every_position():
    # the static cache attends over all block_size keys behind a mask: the logits are the
    # per-row cache's to float rounding, rows at different positions included
    model = tiny_gpt(PEAKY).eval()
    step = compile_decode(model, 'cpu', sample=False)
    static, rows = RowKVCache(model, 2, static=True), RowKVCache(model, 2)
    rows.pos[1] = static.pos[1] = 3  # row 1 starts at position 3 (keys 0..2 are zeros)
    for t in range(12):
        x = torch.tensor([[t % 65], [(7 * t) % 65]])
        with torch.no_grad():
            a, b = step(static, x), decode_step(model, rows, x)
        assert torch.allclose(a, b, atol=1e-5), t
    assert static.pos.tolist() == rows.pos.tolist() == [12, 15]


def test_each_model_gets_a_compiled_step_of_its_own():
    # a step's weights are frozen into its graph and its model is not checked at each call: a
    # second model, of the same shapes, must not run the first one's graph
    a, b = tiny_gpt(PEAKY).eval(), tiny_gpt(PEAKY).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(-1)
    idx = torch.tensor([[1, 2, 3]])
    texts = [generate(model, idx, 12, temperature=0.0, step=compile_decode(model, 'cpu'))
             for model in (a, b)]
    assert not torch.equal(*texts)
    for model, text in zip((a, b), texts):
        assert torch.equal(text, generate(model, idx, 12, temperature=0.0))


def test_a_compiled_step_needs_seeds_to_sample():
    model = tiny_gpt(PEAKY).eval()
    with pytest.raises(ValueError, match="samples with seeds"):
        generate(model, torch.tensor([[1]]), 5, step=compile_decode(model, 'cpu'))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'int8'])
def test_the_compiled_step_compiles_on_a_cpu_without_avx512_or_amx(dtype):
    # Inductor's C++ GEMM template is the only matrix product a CPU step may use: it must have a
    # kernel for an AVX2-only CPU (a Zen 3) too, mocked by telling Inductor to emit 256-bit code
    import torch._inductor.config as inductor

    from nanogpt.quantize import quantize_int8
    model = tiny_gpt(PEAKY, block_size=32).eval()
    model = quantize_int8(model).eval() if dtype == 'int8' else model
    idx = torch.tensor([[1, 2, 3]])
    autocast = torch.autocast('cpu', torch.bfloat16, enabled=dtype == 'bfloat16')
    with inductor.patch({'cpp.simdlen': 256}), autocast:
        compiled = generate(model, idx, 60, temperature=0.0, step=compile_decode(model, 'cpu'))
        eager = generate(model, idx, 60, temperature=0.0)
    assert compiled.shape == eager.shape == (1, 63)
    if dtype == 'float32':
        assert torch.equal(compiled, eager)


def test_auto_compiles_only_runs_long_enough_to_repay_it():
    from nanogpt.device import COMPILE_MIN_STEPS, resolve_decode_compile
    from nanogpt.errors import UserError
    assert not resolve_decode_compile('auto', 'cpu', 500)  # the README's default
    # compiling (~42 s on a 2-core CPU) costs more than 10,000 bf16 steps save (~26 s)
    assert not resolve_decode_compile('auto', 'cpu', 10_000)
    assert resolve_decode_compile('auto', 'cpu', COMPILE_MIN_STEPS)
    assert resolve_decode_compile('auto', 'cuda:1')  # a server on a GPU
    assert not resolve_decode_compile('auto', 'cpu')  # a server on a CPU
    assert resolve_decode_compile('auto', 'cpu', COMPILE_MIN_STEPS, rows=4)
    assert not resolve_decode_compile('auto', 'cpu', COMPILE_MIN_STEPS, rows=16)
    assert resolve_decode_compile(True, 'cpu', 1)
    assert not resolve_decode_compile(False, 'cuda')
    with pytest.raises(UserError, match="compile must be"):
        resolve_decode_compile('yes', 'cpu', 10)


def test_sample_py_with_compile_prints_the_eager_paths_text(trained_run, capsys):
    # sample.py's compiled path end to end, in fp32: the checkpoint's greedy text, unchanged
    from sample import SampleConfig
    from sample import main as sample
    cfg = dict(out_dir=str(trained_run), start='ROMEO:', num_samples=2, max_new_tokens=60,
               temperature=0.0, device='cpu', dtype='float32')
    eager = sample(SampleConfig(**cfg, compile=False))
    compiled = sample(SampleConfig(**cfg, compile=True))
    assert compiled == eager and len(eager[0]) > 50
    assert 'compiled decode step' in capsys.readouterr().out


def test_bench_sample_times_the_compiled_step_beside_the_machines_limit(capsys):
    from scripts import bench_sample
    cfg = bench_sample.BenchSampleConfig(n_layer=2, n_head=2, n_embd=32, block_size=32,
                                         max_new_tokens=40, repeats=1, use_cache='on',
                                         dtypes='float32,int8', device='cpu')
    results = bench_sample.main(cfg)
    assert set(results) == {(True, d, c) for d in ('float32', 'int8') for c in (False, True)}
    assert all(tps > 0 for tps in results.values())
    out = capsys.readouterr().out
    assert 'KV cache, float32, compiled: compiled in' in out
    assert 'limit, float32:' in out and 'GB/s measured' in out and '% of the limit' in out
    # int8 reads a quarter of fp32's weight bytes
    mb = dict(re.findall(r'limit, (\w+): .*?([\d.]+) MB of weights', out))
    assert float(mb['int8']) * 4 == pytest.approx(float(mb["float32"]), rel=0.02)
