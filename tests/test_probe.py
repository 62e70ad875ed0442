"""Trust, rounds two and three: each case an adversarial probe broke or found weak, in its shortest
form. A bad input ends in one line that says what to do, and loses nothing."""

import json
import math
import os
import shutil
import signal
import zipfile

import numpy as np
import pytest
import torch

import eval as eval_script
import sample
import train
from configurator import load_config
from conftest import dir_snapshot, fails, flags, tiny_train_config, train_args
from nanogpt import dataset
from nanogpt.checkpoint import load_checkpoint, save_checkpoint
from nanogpt.errors import UserError
from nanogpt.prepare import write_split
from nanogpt.run_dir import claim_out_dir
from scripts import plot


def resume(out, data, **overrides):
    """The config that resumes the trained run (10 steps) to 20 steps."""
    return tiny_train_config(out, data, **{'max_iters': 20, 'eval_interval': 5,
                                           'init_from': 'resume', **overrides})


# --------------------------------------------------------------------------------------------------
# out_dir: one run at a time, no silent replacement, a metrics log that survives crashes


def test_a_partial_last_line_of_the_metrics_log_is_dropped_and_said(out_dir, char_data, capsys):
    with open(out_dir / 'metrics.jsonl', 'a') as f:
        f.write('{"iter": 10, "train_lo')  # a full disk cut the write
    assert plot.read_metrics(str(out_dir))  # plot.py reads the rest
    train.main(resume(out_dir, char_data))
    assert 'dropped 1 unreadable line(s)' in capsys.readouterr().out
    rows = [json.loads(line) for line in open(out_dir / 'metrics.jsonl')]  # all whole again
    assert rows[-1]['iter'] == 20


def test_a_second_run_on_a_busy_out_dir_is_refused(out_dir, char_data, capsys):
    other = claim_out_dir(resume(out_dir, char_data))  # another run holds the folder
    try:
        err = fails(train, train.TrainConfig, train_args(out_dir, char_data), out_dir, capsys)
        assert 'is in use by another training run: wait for it to end' in err
    finally:
        os.close(other)
    train.main(resume(out_dir, char_data))  # released: this one may go on


def test_a_new_run_never_replaces_a_run_unless_asked(out_dir, char_data, capsys):
    args = train_args(out_dir, char_data, '--init_from=scratch')
    err = fails(train, train.TrainConfig, args, out_dir, capsys)
    assert 'already holds a run (ckpt.pt): continue it with --init_from=resume' in err
    assert 'or replace it with --overwrite=True' in err
    train.main(tiny_train_config(out_dir, char_data, max_iters=5, eval_interval=5, overwrite=True))
    assert load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['iter_num'] == 5


@pytest.mark.parametrize('bad', ['a file', ''])
def test_an_out_dir_that_is_no_folder_is_refused(tmp_path, char_data, bad):
    path = ''
    if bad:
        path = tmp_path / 'out'
        path.write_text('not a folder')
    with pytest.raises(UserError, match="is not a folder: give the run one"):
        train.main(tiny_train_config(path, char_data))


# --------------------------------------------------------------------------------------------------
# checked checkpoints


def flip_a_weight_bit(path):
    """Flip one bit in the middle of the largest tensor's bytes, inside the zip torch.save wrote."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), 'little') for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2 + 3)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x40]))  # an exponent bit: a weight becomes huge


def test_a_flipped_bit_in_a_checkpoint_is_caught_before_use(out_dir, char_data, capsys):
    flip_a_weight_bit(out_dir / 'best.pt')
    args = [f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=5']
    err = fails(sample, sample.SampleConfig, args, out_dir, capsys)
    assert 'fails its CRC-32 check' in err and 'use another one, e.g. ckpt_prev.pt' in err


def test_a_resume_refuses_weights_that_are_not_finite(out_dir, char_data, capsys):
    ckpt = dict(load_checkpoint(out_dir / 'ckpt.pt'))
    ckpt['model'] = {k: v.clone() for k, v in ckpt['model'].items()}
    ckpt['model']['lm_head.weight'][0, 0] = float('inf')
    save_checkpoint(ckpt, out_dir, is_best=False)
    err = fails(train, train.TrainConfig, train_args(out_dir, char_data), out_dir, capsys)
    assert 'holds weights that are not finite (lm_head.weight)' in err


@pytest.mark.parametrize('damage, message', [
    (lambda c: c.pop('model_args'), 'malformed (no model_args)'),
    (lambda c: c['model_args'].update(n_experts=8), "malformed (model_args {"),
    (lambda c: c['model_args'].update(n_embd=10**9), 'malformed (token embedding (65, 32), '
                                                     'model_args (65, 1000000000))'),
    (lambda c: c['model_args'].update(n_layer=5), 'malformed (n_layer=5 does not match'),
    (lambda c: c['vocab'].update(chars=c['vocab']['chars'][:20]),
     'its vocabulary has 20 tokens, its embedding 65 rows'),
])
def test_a_malformed_checkpoint_is_one_line_not_a_traceback(out_dir, capsys, damage, message):
    ckpt = load_checkpoint(out_dir / 'best.pt')
    ckpt = {**ckpt, 'model_args': dict(ckpt['model_args']), 'vocab': dict(ckpt['vocab'])}
    damage(ckpt)
    torch.save(ckpt, out_dir / 'new.pt')  # not in place: the loaded tensors map best.pt's bytes
    os.replace(out_dir / 'new.pt', out_dir / 'best.pt')
    args = [f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=5']
    assert message in fails(sample, sample.SampleConfig, args, out_dir, capsys)


def test_an_evaluation_whose_loss_overflows_reports_an_infinite_perplexity(out_dir, char_data):
    ckpt = load_checkpoint(out_dir / 'best.pt')
    ckpt = {**ckpt, 'model': {k: v * (1e4 if k == 'lm_head.weight' else 1)
                              for k, v in ckpt['model'].items()}}
    ckpt['model']['transformer.wte.weight'] = ckpt['model']['lm_head.weight']
    save_checkpoint(ckpt, out_dir, is_best=True)
    r = eval_script.main(eval_script.EvalConfig(out_dir=str(out_dir), data_dir=char_data,
                                                device='cpu', max_tokens=500, bleu_samples=0))
    assert r['loss'] > 709 and r['perplexity'] == math.inf


# --------------------------------------------------------------------------------------------------
# checked data


@pytest.fixture
def data(char_data, tmp_path):
    return shutil.copytree(char_data, tmp_path / 'data')


def test_token_ids_outside_the_vocabulary_are_refused_when_the_data_is_opened(data):
    meta = json.loads((data / 'meta.json').read_text())
    del meta['train']  # as an older prepare script wrote it: no record to check against
    (data / 'meta.json').write_text(json.dumps(meta))
    write_split(np.array([1, 2, 3, 100] * 50), data / 'train.bin')
    with pytest.raises(UserError, match='holds token id 100, outside the vocabulary of 65'):
        dataset.open_dataset('shakespeare_char', str(data), 32)


@pytest.mark.parametrize('damage', ['another train.bin', 'truncated', 'odd length'])
def test_bins_that_disagree_with_their_meta_json_are_refused(data, damage):
    train_bin = data / 'train.bin'
    ids = np.fromfile(train_bin, dtype=np.uint16)
    if damage == 'another train.bin':  # an interrupted prepare run, new bin beside old meta
        write_split(np.roll(ids, 1), train_bin)
    else:
        train_bin.write_bytes(train_bin.read_bytes()[:len(ids) + (damage == 'odd length')])
    with pytest.raises(UserError, match="train.bin is not the file meta.json beside it describes"):
        dataset.open_dataset('shakespeare_char', str(data), 32)


def test_a_malformed_meta_json_is_one_line(data):
    (data / 'meta.json').write_text('{"vocab": {"kind": "char"')
    with pytest.raises(UserError, match=r"meta.json is malformed \(JSONDecodeError"):
        dataset.open_dataset('shakespeare_char', str(data), 32)


def test_prepare_writes_nothing_until_it_is_complete_and_refuses_empty_text(data, tmp_path):
    from nanogpt.prepare import split_and_write, write_dataset
    before = dir_snapshot(data)
    with pytest.raises(UserError, match='the input text is empty'):
        split_and_write('  \n', {'kind': 'char', 'chars': ' \n'}, str(data))
    with pytest.raises(UserError, match='the val split would be empty'):
        write_dataset(str(data), [0, 1], [], {'kind': 'char', 'chars': 'ab'}, 2)
    assert {k: v for k, v in dir_snapshot(data).items() if not k.endswith('.tmp')} == before


def test_a_resume_on_other_data_with_the_same_vocabulary_is_refused(out_dir, data, capsys):
    ids = np.fromfile(data / 'val.bin', dtype=np.uint16)
    from nanogpt.prepare import write_dataset
    meta = json.loads((data / 'meta.json').read_text())
    train_ids = np.fromfile(data / 'train.bin', dtype=np.uint16)
    write_dataset(str(data), train_ids, ids[::-1], meta['vocab'], meta['vocab_size'])
    err = fails(train, train.TrainConfig, train_args(out_dir, data), out_dir, capsys)
    assert 'was trained on other data than dataset' in err and '(its val.bin differs)' in err


# --------------------------------------------------------------------------------------------------
# the rest of the weak cases


def test_a_full_disk_during_a_save_leaves_the_checkpoints_and_no_temporary_file(out_dir,
                                                                               monkeypatch):
    before = dir_snapshot(out_dir)

    def full_disk(obj, f):
        f.write(b'x' * 1000)
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(UserError, match=r"could not write a checkpoint to .* \(\[Errno 28\] No "
                                        "space left on device\\): free some disk space"):
        save_checkpoint({'model': {}}, out_dir, is_best=True)
    assert dir_snapshot(out_dir) == before


@pytest.mark.parametrize('text, where', [("max_iters = 5\nlr = (\n", 'line 2: SyntaxError'),
                                         ("max_iters = 5\nraise ValueError('no')\n",
                                          'line 2: ValueError: no')])
def test_a_config_file_with_an_error_is_one_line_with_its_line_number(tmp_path, text, where):
    path = tmp_path / 'cfg.py'
    path.write_text(text)
    with pytest.raises(UserError, match=f"config file {path}, {where}"):
        load_config(train.TrainConfig, [str(path)])


def test_a_prompt_file_that_is_not_utf8_and_a_nan_temperature_are_refused(out_dir, tmp_path,
                                                                          capsys):
    (tmp_path / 'prompt.txt').write_bytes(b'ROMEO \xe9t\xe9')
    base = [f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=5']
    err = fails(sample, sample.SampleConfig, [*base, f'--start=FILE:{tmp_path}/prompt.txt'],
                out_dir, capsys)
    assert 'prompt.txt is not UTF-8 text (byte 6)' in err
    with pytest.raises(UserError, match='temperature must be 0 or more, got nan'):
        sample.main(sample.SampleConfig(out_dir=str(out_dir), temperature=float('nan')))


@pytest.mark.parametrize('extra, message', [
    (['--weight_decay=-0.1'], 'weight_decay must be zero or more, got -0.1'),
    (['--beta2=1.0'], 'beta2 must be in [0, 1), got 1.0'),
    (['--learning_rate=0'], 'learning_rate must be positive, got 0.0'),
    (['--init_from=scratch', '--overwrite=True', '--n_layer=48', '--n_embd=65536',
      '--n_head=64'], 'parameters needs ~'),
])
def test_optimizer_values_and_huge_models_are_refused_before_anything_runs(
        out_dir, char_data, capsys, extra, message):
    err = fails(train, train.TrainConfig, train_args(out_dir, char_data, *extra), out_dir, capsys)
    assert message in err


def test_eval_of_the_train_split_does_not_need_a_long_val_split(out_dir, data):
    write_split(np.arange(10) % 65, data / 'val.bin')
    meta = json.loads((data / 'meta.json').read_text())
    del meta['val']
    (data / 'meta.json').write_text(json.dumps(meta))
    r = eval_script.main(eval_script.EvalConfig(out_dir=str(out_dir), data_dir=str(data),
                                                split='train', device='cpu', max_tokens=300,
                                                bleu_samples=0))
    assert r['split'] == 'train' and r['scored_tokens'] == 299


def test_too_few_bleu_spans_are_refused_before_the_loss_pass(out_dir, char_data, monkeypatch):
    monkeypatch.setattr(eval_script, 'split_loss', lambda *a, **k: pytest.fail('loss pass ran'))
    with pytest.raises(UserError, match='spans of 256 tokens for BLEU'):
        eval_script.main(eval_script.EvalConfig(out_dir=str(out_dir), data_dir=char_data,
                                                device='cpu', max_tokens=1000, bleu_samples=50))


def test_a_signal_during_an_evaluation_stops_within_one_batch(out_dir, char_data, monkeypatch):
    get_batch, eval_batches = dataset.get_batch, []

    def get_batch_and_signal(data, block_size, batch_size, seed, rows=None, device='cpu'):
        if seed == dataset.batch_seed(1337, 'eval_train', 1):  # the second batch of the evaluation
            signal.raise_signal(signal.SIGTERM)
        if seed // 2**32 in (1337 * 4 + 2, 1337 * 4 + 3):
            eval_batches.append(seed)
        return get_batch(data, block_size, batch_size, seed, rows, device)
    monkeypatch.setattr(dataset, 'get_batch', get_batch_and_signal)
    result = train.main(resume(out_dir, char_data, max_iters=15))  # evaluates at 15, then stops
    assert result['stop_signal'] == signal.SIGTERM and result['iter_num'] == 15
    assert len(eval_batches) == 2  # of 2 x 5: the evaluation stopped after the batch in flight
    assert load_checkpoint(out_dir / 'ckpt.pt')['iter_num'] == 15  # the step is saved
    assert load_checkpoint(out_dir / 'best.pt')['iter_num'] == 10  # no unfinished evaluation



# --------------------------------------------------------------------------------------------------
# round three (issue 29): input files, exports, knobs (the server's cases are in test_serve.py)


@pytest.mark.parametrize('line, message', [
    (b'{"context": "The \xff", "endings": [" a", " b"], "label": 0}', 'bad.jsonl:1: not UTF-8 '
                                                                      'text (byte 0xff at column'),
    (b'{"context": "The", "endings": ["a", "b"], "label": true}', "bad.jsonl:1: an item needs"),
])
def test_a_multiple_choice_line_that_is_not_utf8_or_has_a_bool_label_is_one_line(
        out_dir, tmp_path, capsys, line, message):
    (tmp_path / 'bad.jsonl').write_bytes(line + b'\n')
    args = [f'--out_dir={out_dir}', '--device=cpu', f'--mc_file={tmp_path}/bad.jsonl']
    assert message in fails(eval_script, eval_script.EvalConfig, args, out_dir, capsys)


def test_a_lora_rank_above_the_models_width_is_refused_before_anything_is_written(
        out_dir, char_data, tmp_path, capsys):
    cfg = tiny_train_config(tmp_path / 'lora', char_data, init_from=str(out_dir),
                            lora_rank=100000)  # a 32-wide model
    err = fails(train, train.TrainConfig, flags(cfg), out_dir, capsys)
    assert 'lora_rank 100000 is more than 32, the smaller side of the matrices it adapts' in err
    assert not os.path.exists(tmp_path / 'lora')


def test_an_export_into_a_folder_it_cannot_write_or_an_earlier_export_is_refused(out_dir,
                                                                                 capsys):
    pytest.importorskip('safetensors', reason='pip install safetensors')
    from scripts import export_hf
    args = [f'--out_dir={out_dir}', '--hf_dir=/proc/nope/hf']
    err = fails(export_hf, export_hf.ExportConfig, args, out_dir, capsys)
    assert 'could not write /proc/nope/hf (No such file or directory)' in err
    export_hf.main(export_hf.ExportConfig(out_dir=str(out_dir)))  # into out_dir/hf
    err = fails(export_hf, export_hf.ExportConfig, [f'--out_dir={out_dir}'], out_dir, capsys)
    assert 'hf is not empty (an earlier export?)' in err and '--overwrite=True' in err
    export_hf.main(export_hf.ExportConfig(out_dir=str(out_dir), overwrite=True))
