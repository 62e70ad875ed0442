"""Bad input: one line saying what to do, exit status 2, and no file in out_dir changed.

Each case runs a script's command line in-process (configurator.cli, as `python train.py ...`
does) against a copy of a trained run's folder, and compares that folder's bytes and mtimes before
and after."""

import json
import shutil

import numpy as np
import pytest

import sample
import train
from conftest import fails, train_args


@pytest.mark.parametrize('extra, message', [
    (['--batchsize=4'], "unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    (['--batch_size=4.5'], "config key 'batch_size' must be int, got float 4.5"),
    (['--batch_size=0'], "batch_size must be positive, got 0"),
    (['--gradient_accumulation_steps=-2'], "gradient_accumulation_steps must be positive, got -2"),
    (['--eval_iters=0'], "eval_iters must be positive, got 0"),
    (['--max_iters=0'],
     "max_iters must be positive, got 0 (to evaluate only, use --eval_only=True)"),
    (['--max_iters=10'],
     "ckpt.pt is at iter 10, max_iters is 10: nothing to train; raise --max_iters"),
    (['--n_embd=64'], "ckpt.pt has n_embd=32 but this run asks for 64: resume with --n_embd=32"),
    (['--block_size=64'], "ckpt.pt has block_size=32 but this run asks for 64 (it learned "
                          "positions for 32 tokens only): resume with --block_size=32"),
    (['--init_from=scratch', '--dataset=nope', "--data_dir=''"],
     "dataset 'nope' not found in "),
])
def test_train_refuses_bad_settings(out_dir, char_data, capsys, extra, message):
    err = fails(train, train.TrainConfig, train_args(out_dir, char_data, *extra), out_dir, capsys)
    assert message in err
    if '--dataset=nope' in extra:
        assert err.endswith(': run `python data/nope/prepare.py` first\n')


def test_train_refuses_a_dataset_of_another_vocabulary(out_dir, char_data, tmp_path, capsys):
    data = shutil.copytree(char_data, tmp_path / 'data')
    meta = json.loads((data / 'meta.json').read_text())
    meta['vocab']['chars'] = meta['vocab']['chars'][::-1]  # 65 characters, in another order
    (data / 'meta.json').write_text(json.dumps(meta))
    args = train_args(out_dir, char_data, f'--data_dir={str(data)!r}')
    err = fails(train, train.TrainConfig, args, out_dir, capsys)
    assert "was trained with another vocabulary than dataset 'shakespeare_char': resume with " \
           "--dataset='shakespeare_char'" in err


@pytest.mark.parametrize('damage', ['missing', 'truncated', 'random bytes', 'empty'])
def test_train_refuses_a_missing_or_corrupt_checkpoint(out_dir, char_data, capsys, damage):
    path = out_dir / 'ckpt.pt'
    data = path.read_bytes()
    path.unlink()
    if damage != 'missing':
        path.write_bytes({'truncated': data[:len(data) // 2], 'random bytes': np.random.bytes(5000),
                          'empty': b''}[damage])
    err = fails(train, train.TrainConfig, train_args(out_dir, char_data), out_dir, capsys)
    if damage == 'missing':
        assert err.startswith(f"error: no checkpoint at {path} (train one first, or point "
                              "--out_dir at the run's")
    else:
        assert err.startswith(f"error: checkpoint {path} cannot be read (")
        assert err.endswith("it is corrupt or not a nanogpt checkpoint: use another one, e.g. "
                            "ckpt_prev.pt or best.pt beside it\n")


@pytest.mark.parametrize('split, tokens', [('val', 32), ('train', 0)])
def test_train_refuses_a_split_too_small_for_the_block_size(out_dir, char_data, tmp_path, capsys,
                                                            split, tokens):
    data = shutil.copytree(char_data, tmp_path / 'data')
    # block_size 32 needs 33 tokens or more; meta.json forgets the split's size and hash, as an
    # older prepare script's did
    np.arange(tokens, dtype=np.uint16).tofile(data / f'{split}.bin')
    meta = json.loads((data / 'meta.json').read_text())
    del meta[split]
    (data / 'meta.json').write_text(json.dumps(meta))
    args = train_args(out_dir, char_data, f'--data_dir={str(data)!r}')
    err = fails(train, train.TrainConfig, args, out_dir, capsys)
    assert f"the {split} split of 'shakespeare_char' has {tokens} tokens, too few for block_size " \
           "32: use a smaller --block_size or more text" in err


@pytest.mark.parametrize('extra, message', [
    (['--start=café €'], "characters not in the model's vocabulary: 'é€' (use only characters the "
                         "model was trained on)"),
    (['--num_samples=0'], "num_samples must be positive, got 0"),
    (['--max_new_tokens=-5'], "max_new_tokens must be positive, got -5"),
    (['--ckpt=nope.pt'], "no checkpoint at "),
    (['--temprature=0.5'], "unknown config key 'temprature' (did you mean 'temperature'?)"),
    (['--top_k=2.5'], "config key 'top_k' must be int or None, got float 2.5"),
])
def test_sample_refuses_bad_settings(out_dir, capsys, extra, message):
    args = [f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=5',
            *extra]
    assert message in fails(sample, sample.SampleConfig, args, out_dir, capsys)


def test_sample_refuses_a_corrupt_checkpoint(out_dir, capsys):
    path = out_dir / 'best.pt'
    data = path.read_bytes()
    path.unlink()  # best.pt is a hard link to a checkpoint: truncate a copy, not the shared file
    path.write_bytes(data[:1000])
    args = [f'--out_dir={out_dir}', '--device=cpu']
    err = fails(sample, sample.SampleConfig, args, out_dir, capsys)
    assert f"checkpoint {path} cannot be read (" in err
