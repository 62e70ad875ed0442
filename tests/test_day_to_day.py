"""Working with runs: the metrics log, loss plots, your own text as a dataset, wandb offline."""

import os
import shutil
import struct

import numpy as np
import pytest

from conftest import metrics, run_script, tiny_train_config
from sample import SampleConfig
from sample import main as sample
from train import main as train


def test_metrics_log_has_one_row_per_logged_step_and_per_eval(tmp_path, char_data):
    train(tiny_train_config(tmp_path, char_data, max_iters=20, log_interval=5, eval_interval=10))
    rows = metrics(tmp_path)
    steps = [r for r in rows if 'train_loss' in r]
    evals = [r for r in rows if 'val_loss' in r]
    assert [r['iter'] for r in steps] == [5, 10, 15, 20]
    assert [r['iter'] for r in evals] == [0, 10, 20]
    tokens_per_iter = 8 * 32  # batch_size x block_size
    assert all(r['tokens'] == r['iter'] * tokens_per_iter for r in rows)
    # (and 'mfu' on a GPU whose peak the data-sheet table knows)
    assert set(steps[0]) == {'iter', 'tokens', 'train_loss', 'lr', 'ms_per_iter', 'time',
                             'peak_mem_gib'}
    # the process's peak resident memory (Linux): the interpreter, torch and the tiny model
    assert 0.1 < steps[0]['peak_mem_gib'] < 4
    assert set(evals[0]) == {'iter', 'tokens', 'eval_train_loss', 'val_loss', 'time'}
    assert steps[-1]['train_loss'] < evals[0]['val_loss']  # it learnt something


def test_metrics_log_survives_resume_without_duplicates(tmp_path, char_data):
    kw = dict(max_iters=20, log_interval=5, eval_interval=10)
    train(tiny_train_config(tmp_path / 'full', char_data, **kw))
    run = tmp_path / 'resumed'
    train(tiny_train_config(run, char_data, **{**kw, 'max_iters': 10}))
    shutil.copy(run / 'ckpt.pt', tmp_path / 'ckpt_at_10.pt')
    train(tiny_train_config(run, char_data, **kw, init_from='resume'))
    # as if the run had crashed after step 20 was logged but with only the step-10 checkpoint
    # saved
    shutil.copy(tmp_path / 'ckpt_at_10.pt', run / 'ckpt.pt')
    train(tiny_train_config(run, char_data, **kw, init_from='resume'))

    def key(rows):
        return [(r['iter'], 'val_loss' in r) for r in rows]
    assert key(metrics(run)) == key(metrics(tmp_path / 'full'))
    for a, b in zip(metrics(run), metrics(tmp_path / 'full')):
        assert a.get('train_loss') == b.get('train_loss')
        assert a.get('val_loss') == b.get('val_loss')


def png_size(path):
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == b'\x89PNG\r\n\x1a\n'
    return struct.unpack('>II', head[16:24])  # width, height from the IHDR chunk


@pytest.mark.slow
def test_plot_writes_a_png_of_the_requested_size(tmp_path, char_data):
    pytest.importorskip('matplotlib')
    for name in ('a', 'b'):
        train(tiny_train_config(tmp_path / name, char_data, max_iters=10, log_interval=2,
                                eval_interval=5))
    out = tmp_path / 'loss.png'
    r = run_script('scripts/plot.py', f"--out_dir={tmp_path / 'a'},{tmp_path / 'b'}",
                   f'--output={out}', '--width=800', '--height=500')
    assert r.returncode == 0, r.stderr
    assert png_size(out) == (800, 500) and os.path.getsize(out) > 10_000
    r = run_script('scripts/plot.py', f"--out_dir={tmp_path / 'nope'}",
                   f'--output={tmp_path / "x.png"}')
    assert r.returncode == 2 and 'no metrics log at' in r.stderr


@pytest.mark.slow
def test_your_own_text_file_trains_and_samples(tmp_path, shakespeare_text):
    src = tmp_path / 'my_novel.txt'
    src.write_text(shakespeare_text[:100_000], encoding='utf-8')
    data = tmp_path / 'my_novel'
    r = run_script('data/text/prepare.py', '--input', str(src), '--out_dir', str(data))
    assert r.returncode == 0, r.stderr
    result = train(tiny_train_config(tmp_path / 'out', data, dataset='my_novel', max_iters=30))
    assert result['losses']['val'] < 3.5
    cfg = SampleConfig(out_dir=str(tmp_path / 'out'), start='KING', num_samples=1,
                       max_new_tokens=20, device='cpu')
    text = sample(cfg)[0]
    assert len(text) == 24 and set(text) <= set(shakespeare_text[:100_000])


@pytest.mark.slow
def test_a_folder_of_documents_with_gpt2_bpe_has_end_of_text_between_them(tmp_path, gpt2_bpe):
    letters = ['Dear Ada, the engine runs.' * 20,
               'Dear Charles, it computes Bernoulli numbers.' * 20]
    docs = tmp_path / 'letters'
    docs.mkdir()
    for i, text in enumerate(letters):
        (docs / f'{i}.txt').write_text(text)
    r = run_script('data/text/prepare.py', '--input', str(docs), '--tokenizer', 'gpt2', '--out_dir',
                   str(tmp_path / 'out'), '--val_fraction=0.2')
    assert r.returncode == 0, r.stderr
    ids = np.concatenate([np.fromfile(tmp_path / 'out' / f'{s}.bin', dtype=np.uint16)
                          for s in ('train', 'val')])
    # the documents in file name order, with one <|endoftext|> token between them
    assert (ids == gpt2_bpe.eot_token).sum() == 1
    assert gpt2_bpe.decode(ids.tolist()) == '<|endoftext|>'.join(letters)


@pytest.mark.slow
def test_bad_encoding_and_empty_input_get_their_messages(tmp_path):
    bad = tmp_path / 'bad.txt'
    bad.write_bytes(b'hello\nworld \xff\xfe oops')
    r = run_script('data/text/prepare.py', '--input', str(bad), '--out_dir', str(tmp_path / 'o'))
    assert r.returncode == 2
    assert r.stderr == f"error: {bad} is not UTF-8 text: byte 0xff at offset 12 (convert it, " \
                       "e.g. iconv -f latin1 -t utf-8)\n"
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    r = run_script('data/text/prepare.py', '--input', str(empty), '--out_dir', str(tmp_path / 'o'))
    assert r.returncode == 2 and 'holds no text' in r.stderr
    assert not (tmp_path / 'o').exists()


@pytest.mark.slow
def test_wandb_logging_writes_an_offline_run(tmp_path, char_data, monkeypatch):
    pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    train(tiny_train_config(tmp_path / 'out', char_data, max_iters=4, log_interval=2,
                            eval_interval=4, wandb_log=True, wandb_project='test',
                            wandb_run_name='tiny'))
    runs = [d for d in os.listdir(tmp_path / 'wandb') if d.startswith('offline-run-')]
    assert len(runs) == 1
    assert any(f.endswith('.wandb') for f in os.listdir(tmp_path / 'wandb' / runs[0]))
