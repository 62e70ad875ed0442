"""Sampling: a checkpoint alone is enough to generate text in its training vocabulary."""

import os
import re
import shutil

import pytest
import torch

import sample as sample_module
from conftest import flags, run_script, tiny_train_config
from model import GPT, GPTConfig
from nanogpt.checkpoint import FORMAT_VERSION, load_model
from nanogpt.errors import UserError
from nanogpt.generation import generate
from nanogpt.quantize import quantize_int8
from sample import SampleConfig
from sample import main as sample
from scripts.bench_sample import BenchSampleConfig
from scripts.bench_sample import main as bench_sample
from train import main as train


@pytest.fixture(scope='module')
def trained(tmp_path_factory, char_data):
    """A tiny trained run whose data folder is deleted afterwards: sampling must not need it."""
    out = tmp_path_factory.mktemp('run')
    data = tmp_path_factory.mktemp('data_copy')
    for name in ('train.bin', 'val.bin', 'meta.json'):
        shutil.copy(os.path.join(char_data, name), data)
    train(tiny_train_config(out, data, max_iters=30))
    shutil.rmtree(data)
    vocab = set(open(os.path.join(char_data, 'input.txt'), encoding='utf-8').read())
    return str(out), vocab


def test_samples_have_the_requested_length_in_the_training_vocabulary(trained):
    out_dir, vocab = trained
    samples = sample(SampleConfig(out_dir=out_dir, start='ROMEO:', num_samples=3, max_new_tokens=40,
                                  device='cpu'))
    assert len(samples) == 3
    for s in samples:
        assert s.startswith('ROMEO:') and len(s) == len('ROMEO:') + 40 and set(s) <= vocab


def test_the_same_seed_gives_the_same_samples(trained):
    out_dir, _ = trained
    cfg = SampleConfig(out_dir=out_dir, num_samples=2, max_new_tokens=20, device='cpu', seed=3)
    assert sample(cfg) == sample(cfg)


def test_a_prompt_can_be_read_from_a_file(trained, tmp_path):
    out_dir, _ = trained
    (tmp_path / 'prompt.txt').write_text('JULIET:\n')
    s = sample(SampleConfig(out_dir=out_dir, start=f"FILE:{tmp_path / 'prompt.txt'}", num_samples=1,
                            max_new_tokens=5, device='cpu'))
    assert s[0].startswith('JULIET:\n') and len(s[0]) == 13


def test_prompt_outside_the_vocabulary_lists_the_characters(trained):
    out_dir, _ = trained
    with pytest.raises(UserError, match=r"not in the model's vocabulary: 'é€'"):
        sample(SampleConfig(out_dir=out_dir, start='café €', device='cpu'))


@pytest.mark.slow
def test_sample_from_the_command_line_prints_what_main_returns(trained):
    out_dir, _ = trained
    args = dict(out_dir=out_dir, num_samples=2, max_new_tokens=25, device='cpu')
    r = run_script('sample.py', *flags(args))
    assert r.returncode == 0, r.stderr
    samples = sample(SampleConfig(**args))
    assert r.stdout.startswith(''.join(s + '\n---------------\n' for s in samples))
    assert re.search(r'^50 tokens in [0-9.]+ s: [0-9,.]+ tokens/s on cpu', r.stdout, re.MULTILINE)
    r = run_script('sample.py', f'--out_dir={out_dir}/nope')
    assert r.returncode == 2 and r.stderr.startswith('error: no checkpoint at')
    assert r.stderr.count('\n') == 1


def test_sampling_a_checkpoint_does_not_load_the_compiler(trained):
    """torch._dynamo takes ~1 s to import; a model built on the meta device to receive a checkpoint
    imported it through normal_'s meta kernel (model.SkipInit), in every sample.py start."""
    out_dir, _ = trained
    code = ("import sys, runpy; sys.argv = ['sample.py', '--out_dir=%s', '--max_new_tokens=3', "
            "'--num_samples=1']; runpy.run_path('sample.py', run_name='__main__'); "
            "print('dynamo imported:', 'torch._dynamo.convert_frame' in sys.modules)" % out_dir)
    r = run_script('-c', code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith('dynamo imported: False')


def test_one_sample_is_streamed_token_by_token_as_the_returned_text(trained, monkeypatch):
    out_dir, _ = trained
    pieces = []
    # sample.py's own print, shadowing the builtin
    monkeypatch.setattr(sample_module, 'print',
                        lambda *a, end='\n', **kw: pieces.append(''.join(a) + end), raising=False)
    s = sample(SampleConfig(out_dir=out_dir, start='ROMEO:', num_samples=1, max_new_tokens=30,
                            device='cpu'))[0]
    # the prompt, then one character per token
    assert len(pieces) >= 1 + 30 and pieces[1] == s[6]
    assert ''.join(pieces[:-2]) == s + '\n' and pieces[-2] == '---------------\n'
    assert 'tokens/s' in pieces[-1]


def test_streamed_bpe_text_waits_for_whole_characters(tmp_path, capsys, gpt2_bpe):
    """A BPE token can be part of a multi-byte character: the stream prints it once it is whole."""
    torch.manual_seed(0)
    args = dict(block_size=32, vocab_size=50257, n_layer=1, n_head=1, n_embd=8, dropout=0.0,
                bias=False)
    model = GPT(GPTConfig(**args)).eval()
    torch.save({'format_version': FORMAT_VERSION, 'model': model.state_dict(), 'model_args': args,
                'vocab': gpt2_bpe.spec}, tmp_path / 'best.pt')
    cfg = SampleConfig(out_dir=str(tmp_path), start='Hello', num_samples=1, max_new_tokens=60,
                       temperature=1.0, top_k=None, device='cpu', seed=0)
    # the same draw as sample.py's: some prefix of it ends inside a character (else this test tests
    # nothing)
    ids = generate(model, torch.tensor([gpt2_bpe.encode('Hello')]), 60, temperature=1.0,
                   seeds=torch.tensor([0]))
    assert any(gpt2_bpe.decode(ids[0, :n].tolist()).endswith('\ufffd') for n in range(2, 62))
    s = sample(cfg)[0]
    out = capsys.readouterr().out
    assert out.startswith(s + '\n---------------\n') and out.count('\n') == s.count('\n') + 3


def test_a_stop_string_ends_each_sample_after_it(trained):
    out_dir, _ = trained
    kw = dict(out_dir=out_dir, start='ROMEO:', num_samples=3, max_new_tokens=60, device='cpu')
    full = sample(SampleConfig(**kw))
    stopped = sample(SampleConfig(**kw, stop='e'))
    assert sum('e' in f[6:] for f in full) >= 2  # most samples have an 'e' to stop at
    for f, s in zip(full, stopped):
        assert s == (f[:f.index('e', 6) + 1] if 'e' in f[6:] else f)


def test_sample_i_of_a_batch_is_the_single_sample_of_seed_plus_i(trained):
    out_dir, _ = trained
    kw = dict(out_dir=out_dir, max_new_tokens=50, device='cpu')
    batch = sample(SampleConfig(**kw, num_samples=3, seed=5))
    alone = sample(SampleConfig(**kw, num_samples=1, seed=7))
    assert batch[2] == alone[0] and batch[0] != batch[2]


def test_with_and_without_the_cache_the_same_text_within_block_size(trained):
    out_dir, _ = trained  # block_size 32: a 6-character prompt and 26 new ones
    # in fp32, where the two paths compute the same logits (bf16 rounds them differently)
    kw = dict(out_dir=out_dir, start='ROMEO:', num_samples=2, max_new_tokens=26, device='cpu',
              dtype='float32')
    assert sample(SampleConfig(**kw)) == sample(SampleConfig(**kw, use_cache=False))


def test_int8_samples_with_the_int8_weights(trained, capsys):
    # --int8=True decodes with quantize_int8's copy of the model: its greedy text, not fp32's
    out_dir, _ = trained
    kw = dict(out_dir=out_dir, start='ROMEO:', num_samples=2, max_new_tokens=25,
              temperature=0.0, device='cpu', dtype='float32')
    text = sample(SampleConfig(**kw, int8=True))
    assert 'int8 weights' in capsys.readouterr().out
    model, tokenizer, _ = load_model('resume', out_dir, 'best.pt')
    idx = torch.tensor([tokenizer.encode('ROMEO:')])
    with torch.no_grad():
        ids = generate(quantize_int8(model).eval(), idx, 25, temperature=0.0)
    assert text[0] == tokenizer.decode(ids[0].tolist())


def test_bf16_barely_changes_the_val_loss_and_greedy_text(trained, char_data):
    out_dir, _ = trained
    loss, same = bench_sample(BenchSampleConfig(mode='bf16', out_dir=out_dir, data_dir=char_data,
                                                eval_iters=2, n_prompts=8, greedy_prompt_len=8,
                                                greedy_tokens=20, device='cpu'))
    # trained: below ln(65)
    assert abs(loss['bfloat16'] - loss['float32']) < 0.01 and loss['float32'] < 4.0
    # most continuations agree for all 20 tokens
    assert same.shape == (8,) and (same == 20).sum() >= 4
    with pytest.raises(UserError, match="use_cache must be"):
        bench_sample(BenchSampleConfig(out_dir=out_dir, use_cache='maybe', device='cpu'))


def test_the_sampling_benchmark_times_each_path_of_a_model_shape():
    results = bench_sample(BenchSampleConfig(n_layer=1, n_head=2, n_embd=16, block_size=8,
                                             max_new_tokens=20, repeats=2, compiled=False,
                                             dtypes='float32,bfloat16', device='cpu'))
    # the cached path in each dtype, and the classic loop in fp32 only (its baseline); the
    # compiled paths: tests/test_compiled_decode.py
    assert set(results) == {(True, 'float32', False), (True, 'bfloat16', False),
                            (False, 'float32', False)}
