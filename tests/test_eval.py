"""Evaluation: the whole-split loss against a per-token brute force, the metrics derived from it,
BLEU, and the mistakes eval.py refuses."""

import json
import math
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import run_script, tiny_train_config
from eval import EvalConfig, corpus_bleu, sliding_windows, split_loss
from eval import main as evaluate
from nanogpt.checkpoint import load_checkpoint, model_from_checkpoint
from nanogpt.errors import UserError
from nanogpt.tokenizer import Tokenizer, char_vocab
from train import main as train


@pytest.fixture(scope='module')
def run(tmp_path_factory, char_data):
    """A tiny model (block_size 32) trained for a few steps on Shakespeare, and its data folder."""
    out = tmp_path_factory.mktemp('run')
    train(tiny_train_config(out, char_data, max_iters=20))
    return str(out), char_data


def eval_config(run, **overrides):
    out_dir, data_dir = run
    defaults = dict(out_dir=out_dir, data_dir=data_dir, device='cpu', bleu_samples=0)
    return EvalConfig(**{**defaults, **overrides})


def trained_model(out_dir):
    return model_from_checkpoint(load_checkpoint(os.path.join(out_dir, 'best.pt')),
                                 dropout=0.0).eval()


def val_tokens(data_dir, n):
    return np.fromfile(os.path.join(data_dir, 'val.bin'), dtype=np.uint16)[:n]


@pytest.mark.parametrize('n, block_size, stride', [(100, 32, 16), (100, 32, 1), (100, 32, 32),
                                                   (101, 32, 7), (33, 32, 16), (1000, 64, 63)])
def test_sliding_windows_score_every_token_but_the_first_exactly_once(n, block_size, stride):
    begins, scored = sliding_windows(n, block_size, stride)
    times_scored = np.zeros(n, dtype=int)
    for b, k in zip(begins, scored):
        assert 0 <= b and b + block_size <= n - 1  # every window is whole, inside the stream
        times_scored[b + block_size - k + 1:b + block_size + 1] += 1  # its last k targets
    assert times_scored[0] == 0 and (times_scored[1:] == 1).all()
    # so each scored token has >= block_size - stride + 1 tokens of context
    assert all(k <= stride for k in scored[1:])


def brute_force_nats(model, data, block_size, stride):
    """Each token p >= 1 alone, fp32, with the context the sliding window gives it, written per
    token: tokens 1..block_size are predicted from the start of the stream; a later token p from
    the window k = ceil((p - block_size) / stride), which starts at k * stride (the last one at
    n - 1 - block_size)."""
    n, nats = len(data), []
    for p in range(1, n):
        if p <= block_size:
            begin = 0
        else:
            begin = min(math.ceil((p - block_size) / stride) * stride, n - 1 - block_size)
        context = torch.from_numpy(data[begin:p].astype(np.int64))[None]  # (1, p - begin)
        logits, _ = model(context, context)  # targets only to get the logits of every position
        target = torch.tensor(int(data[p]))
        nats.append(F.cross_entropy(logits[0, -1].float(), target).item())
    return nats


@pytest.mark.parametrize('stride', [1, 7, 16, 32])
def test_whole_split_loss_equals_a_per_token_brute_force(run, stride):
    out_dir, data_dir = run
    model = trained_model(out_dir)
    data = val_tokens(data_dir, 150)
    with torch.no_grad():
        nats, n = split_loss(model, data, 32, stride, batch_size=5, progress=False)
        reference = brute_force_nats(model, data, 32, stride)
    assert n == len(reference) == 149
    assert abs(nats / n - sum(reference) / n) < 1e-5


def test_stride_1_gives_every_token_its_full_context(run):
    # an independent definition of the best possible context: the block_size tokens before each
    # token
    out_dir, data_dir = run
    model = trained_model(out_dir)
    data = val_tokens(data_dir, 100)
    reference = 0.0
    with torch.no_grad():
        for p in range(1, len(data)):
            context = torch.from_numpy(data[max(0, p - 32):p].astype(np.int64))[None]
            logits, _ = model(context, context)
            reference += F.cross_entropy(logits[0, -1], torch.tensor(int(data[p]))).item()
        nats, n = split_loss(model, data, 32, 1, batch_size=16, progress=False)
    assert abs(nats / n - reference / n) < 1e-5


def test_metrics_follow_from_the_loss(run):
    r = evaluate(eval_config(run, max_tokens=500))
    assert r['tokens'] == 500 and r['scored_tokens'] == 499
    # character-level Shakespeare is ASCII: one token = one character = one byte
    assert r['scored_characters'] == r['scored_bytes'] == 499 and r['unit'] == 'character'
    assert r['perplexity'] == pytest.approx(math.exp(r['loss']), rel=1e-12)
    assert r['bits_per_token'] == pytest.approx(r['loss'] / math.log(2), rel=1e-12)
    assert r['bits_per_character'] == r['bits_per_byte'] == \
        pytest.approx(r['bits_per_token'], rel=1e-12)
    assert 2.5 < r['loss'] < math.log(65)  # a little better than uniform over the 65 characters


def test_evaluation_is_deterministic_and_independent_of_batch_size(run):
    first, again = (evaluate(eval_config(run, max_tokens=2000, batch_size=8)) for _ in range(2))
    assert again == first
    for batch_size in (1, 3, 200):
        # window sums are added in window order whatever the batches; bit for bit equal here, the
        # tolerance only lets another machine's kernels round differently for other batch shapes
        assert evaluate(eval_config(run, max_tokens=2000, batch_size=batch_size))['loss'] == \
            pytest.approx(first['loss'], rel=1e-9, abs=0)


@pytest.mark.slow
def test_bits_per_byte_counts_the_utf8_bytes_of_the_text(tmp_path, shakespeare_text, gpt2_bpe):
    """A BPE model: bits per byte divide by the bytes of the scored text (tokens 1..n-1)."""
    from nanogpt.prepare import write_dataset
    tok = gpt2_bpe
    text = shakespeare_text[:20000]
    write_dataset(str(tmp_path / 'data'), tok.encode(text[:15000]), tok.encode(text[15000:]),
                  tok.spec, tok.vocab_size)
    train(tiny_train_config(tmp_path / 'run', tmp_path / 'data', max_iters=1, n_embd=16, n_head=1,
                            n_layer=1))
    r = evaluate(eval_config((str(tmp_path / 'run'), str(tmp_path / 'data')), max_tokens=300))
    ids = val_tokens(tmp_path / 'data', 300).tolist()
    scored_text = tok.decode(ids[1:])
    assert r['unit'] == 'byte' and r['scored_tokens'] == 299
    assert r['scored_bytes'] == len(scored_text.encode('utf-8'))
    assert r['scored_characters'] == len(scored_text)
    assert r['bits_per_byte'] == \
        pytest.approx(r['loss'] * 299 / math.log(2) / r['scored_bytes'], rel=1e-12)


def test_text_sizes_count_bytes_and_characters_exactly(gpt2_bpe):
    text = 'naïve café — 日本語, x² ✓\n'
    n_bytes, n_chars = Tokenizer(char_vocab(text)).text_sizes()
    ids = Tokenizer(char_vocab(text)).encode(text)
    assert sum(n_bytes[i] for i in ids) == len(text.encode('utf-8'))
    assert sum(n_chars[i] for i in ids) == len(text)
    ids = gpt2_bpe.encode(text + '<|endoftext|>')
    # some tokens hold only part of a character (the CJK ones are split across byte tokens)
    assert any('\ufffd' in gpt2_bpe.decode([i]) for i in ids)
    n_bytes, n_chars = gpt2_bpe.text_sizes()
    assert sum(n_bytes[i] for i in ids) == len(text.encode('utf-8'))  # <|endoftext|> is no text
    assert sum(n_chars[i] for i in ids) == len(text)


def test_bleu_of_the_real_text_is_100_and_of_unrelated_text_near_0(shakespeare_text):
    lines = [line for line in shakespeare_text.splitlines() if len(line.split()) >= 6][:200]
    same = corpus_bleu(lines, lines)
    assert same['bleu'] == pytest.approx(100.0) and same['bleu_precisions'] == [100.0] * 4
    assert same['bleu_signature'].startswith(
        'nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:')
    unrelated = lines[100:] + lines[:100]  # every line scored against another line of the play
    assert corpus_bleu(unrelated, lines)['bleu'] < 3
    assert corpus_bleu(['0 1 2 3 4 5 6 7'] * len(lines), lines)['bleu'] < 0.1
    # the right words, too few of them
    half = [' '.join(line.split()[:len(line.split()) // 2]) for line in lines]
    assert corpus_bleu(half, lines)['bleu_brevity_penalty'] < 0.5


def test_bleu_compares_generations_with_the_real_continuations(run, shakespeare_text):
    cfg = eval_config(run, max_tokens=5000, bleu_samples=6, bleu_prompt_tokens=20, bleu_tokens=30,
                      batch_size=4)
    r = evaluate(cfg)
    texts = r['bleu_texts']
    assert len(texts) == 6
    for t in texts:
        assert len(t['prompt']) == 20 and len(t['reference']) == 30 and len(t['generation']) == 30
        # the prompt and what really follows it
        assert t['prompt'] + t['reference'] in shakespeare_text
    assert len({t['prompt'] for t in texts}) == 6  # distinct prompts
    bleu = corpus_bleu([t['generation'] for t in texts], [t['reference'] for t in texts])
    assert bleu.items() <= r.items()  # the score, its precisions, brevity penalty and signature
    # greedy and seeded: the same texts every run
    assert evaluate(cfg)['bleu_texts'] == texts


def test_a_checkpoint_with_another_vocabulary_is_refused(run, tmp_path, shakespeare_text):
    from nanogpt.prepare import write_dataset
    text = shakespeare_text[:20000].lower()  # fewer distinct characters: another vocabulary
    tok = Tokenizer(char_vocab(text))
    write_dataset(str(tmp_path), tok.encode(text[:15000]), tok.encode(text[15000:]), tok.spec,
                  tok.vocab_size)
    with pytest.raises(UserError, match=r"trained with another vocabulary \(65 characters\) than "
                                        r"dataset 'shakespeare_char' \(\d\d characters\)"):
        evaluate(eval_config((run[0], str(tmp_path))))


@pytest.mark.parametrize('overrides, message', [
    (dict(block_size=64), "block_size 64 is larger than the model's 32"),
    (dict(stride=33), "stride 33 is larger than block_size 32"),
    (dict(max_tokens=20), "max_tokens 20 leaves too few tokens"),
    (dict(bleu_samples=1000, max_tokens=5000), "holds only 19 spans of 256 tokens"),
    (dict(split='test'), "split must be 'train' or 'val'"),
    # refused before any weights are loaded
    (dict(init_from='gpt2', data_dir=''), "say which data to evaluate gpt2 on"),
])
def test_mistakes_are_one_line_errors(run, overrides, message):
    with pytest.raises(UserError, match=message):
        evaluate(eval_config(run, **overrides))


@pytest.mark.slow
def test_the_command_line_evaluates_the_whole_split_and_writes_json(run, tmp_path):
    out_dir, data_dir = run
    checkpoints = {name: open(os.path.join(out_dir, name), 'rb').read()
                   for name in ('best.pt', 'ckpt.pt')}
    r = run_script('eval.py', f'--out_dir={tmp_path}', f"--ckpt={os.path.join(out_dir, 'best.pt')}",
                   f'--data_dir={data_dir}', '--bleu_samples=4', '--bleu_tokens=16',
                   '--bleu_prompt_tokens=16', '--device=cpu', '--batch_size=64')
    assert r.returncode == 0, r.stderr
    with open(tmp_path / 'eval_best_val.json') as f:
        results = json.load(f)
    assert results['scored_tokens'] == 111539  # every token of the val split but the first
    assert results['config']['block_size'] == 32 and results['config']['stride'] == 16
    # it prints the figures it writes
    assert f"{results['loss']:.4f}" in r.stdout
    assert f"{'bits per character':<20} {results['bits_per_character']:.4f}" in r.stdout
    assert f"{'BLEU':<20} {results['bleu']:.2f}  (1- to 4-gram precisions" in r.stdout
    assert os.listdir(tmp_path) == ['eval_best_val.json']  # no temporary file left behind
    for name, data in checkpoints.items():  # checkpoints are only read
        assert open(os.path.join(out_dir, name), 'rb').read() == data
