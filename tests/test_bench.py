"""bench.py: it times train.py's own step and reports figures that agree with each other."""

import json
import re
import statistics

import pytest

from bench import BenchConfig, main
from conftest import flags, run_script
from model import GPT, GPTConfig

TINY = dict(device='cpu', compile=False, n_layer=1, n_head=2, n_embd=32, block_size=16,
            batch_size=4, gradient_accumulation_steps=2, vocab_size=65, bench_warmup=1,
            bench_iters=4, learning_rate=1e-2)


def test_bench_reports_consistent_figures_on_random_tokens():
    r = main(BenchConfig(**TINY))
    assert r['tokens_per_iter'] == 2 * 4 * 16 and len(r['times']) == 4
    assert r['ms_per_iter'] == pytest.approx(1000 * statistics.median(r['times']))
    assert r['tokens_per_s'] == pytest.approx(r['tokens_per_iter'] / (r['ms_per_iter'] / 1000))
    flops_per_token = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65,
                                    bias=False)).flops_per_token()
    assert r['mfu'] == pytest.approx(flops_per_token * r['tokens_per_s'] / r['peak_flops'])
    # random tokens: nothing to learn beyond ln(65)
    assert r['loss'] == pytest.approx(4.17, abs=0.1)


@pytest.mark.slow
def test_bench_runs_modern_options_and_muon_on_real_data_from_the_command_line(char_data, tmp_path):
    trace = tmp_path / 'trace.json'
    args = flags({k: v for k, v in TINY.items() if k != 'vocab_size'})
    r = run_script('bench.py', *args, f'--data_dir={char_data}', '--dataset=shakespeare_char',
                   '--real_data=True', '--rotary=True', '--relu2=True', '--optimizer=muon',
                   '--profile=True', f'--trace_file={trace}')
    assert r.returncode == 0, r.stderr
    assert 'peak: float32' in r.stdout and 'ms/iter' in r.stdout and 'tokens/s' in r.stdout
    # the profile's table of the top ops, and its chrome trace
    assert 'aten::' in r.stdout
    events = json.loads(trace.read_text())['traceEvents']
    assert any(e.get('name', '').startswith('aten::') for e in events)
    first, last = map(float, re.search(r'loss ([0-9.]+) -> ([0-9.]+)', r.stdout).groups())
    # real text: it learns
    assert first == pytest.approx(4.17, abs=0.15) and last < first - 0.3


@pytest.mark.slow
def test_bench_with_bf16_autocast_on_cpu_measures_both_peaks_and_uses_the_bf16_one(capsys):
    r = main(BenchConfig(**{**TINY, 'dtype': 'bfloat16'}))
    out = capsys.readouterr().out
    assert re.search(r'^device cpu, dtype bfloat16,', out, re.MULTILINE)  # autocast to bf16 is on
    peaks = re.search(r'^peak: float32 ([0-9,]+) GFLOP/s \(measured\), '
                      r'bfloat16 ([0-9,]+) GFLOP/s \(measured\)$', out, re.MULTILINE)
    assert peaks, out
    # MFU divides by the peak of the run's dtype
    assert f"{r['peak_flops'] / 1e9:,.0f}" == peaks[2]
    assert r['loss'] == pytest.approx(4.17, abs=0.1)
