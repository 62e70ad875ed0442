"""Sampling: a checkpoint alone is enough to generate text in its training vocabulary."""

import os
import shutil

import pytest

from configurator import UserError
from conftest import run_script, tiny_train_config
from sample import SampleConfig
from sample import main as sample
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
    samples = sample(SampleConfig(out_dir=out_dir, start='ROMEO:', num_samples=3, max_new_tokens=40, device='cpu'))
    assert len(samples) == 3
    for s in samples:
        assert s.startswith('ROMEO:') and len(s) == len('ROMEO:') + 40 and set(s) <= vocab


def test_same_seed_same_samples(trained):
    out_dir, _ = trained
    cfg = SampleConfig(out_dir=out_dir, num_samples=2, max_new_tokens=20, device='cpu', seed=3)
    assert sample(cfg) == sample(cfg)


def test_prompt_from_file(trained, tmp_path):
    out_dir, _ = trained
    (tmp_path / 'prompt.txt').write_text('JULIET:\n')
    s = sample(SampleConfig(out_dir=out_dir, start=f"FILE:{tmp_path / 'prompt.txt'}", num_samples=1,
                            max_new_tokens=5, device='cpu'))
    assert s[0].startswith('JULIET:\n') and len(s[0]) == 13


def test_prompt_outside_the_vocabulary_lists_the_characters(trained):
    out_dir, _ = trained
    with pytest.raises(UserError, match=r"not in the model's vocabulary: 'é€'"):
        sample(SampleConfig(out_dir=out_dir, start='café €', device='cpu'))


def test_sample_from_the_command_line(trained):
    out_dir, vocab = trained
    r = run_script('sample.py', f'--out_dir={out_dir}', '--num_samples=2', '--max_new_tokens=25', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('---------------') == 2 and 'tokens/s' in r.stdout
    r = run_script('sample.py', f'--out_dir={out_dir}/nope')
    assert r.returncode == 2 and r.stderr.startswith('error: no checkpoint at') and r.stderr.count('\n') == 1
