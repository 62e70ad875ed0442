

def test_bench_sample_times_the_compiled_step_beside_the_machines_limit(capsys):
    import bench_sample
    cfg = bench_sample.BenchSampleConfig(n_layer=2, n_head=2, n_embd=32, block_size=32,
                                         max_new_tokens=40, repeats=1, use_cache='on',
                                         dtypes='float32', device='cpu')
    results = bench_sample.main(cfg)
    assert set(results) == {(True, 'float32', False), (True, 'float32', True)}
    assert all(tps > 0 for tps in results.values())
    out = capsys.readouterr().out
    assert 'KV cache, float32, compiled: compiled in' in out
    assert 'limit, float32:' in out and 'GB/s measured' in out and '% of the limit' in out
