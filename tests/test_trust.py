"""Training you can trust: exact resume, crash-safe checkpoints, graceful stop, non-finite losses,
safe loading. The comment at the top of each test says how the classic nanoGPT fails it."""

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import train
from conftest import REPO, dir_snapshot, flags, run_script, same_weights, tiny_train_config, weights
from model import GPT, GPTConfig
from nanogpt import dataset
from nanogpt.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from nanogpt.errors import UserError


def checkpoint_files(out_dir):
    """The files of out_dir but the metrics log, which every run writes."""
    return sorted(f for f in os.listdir(out_dir) if f != 'metrics.jsonl')


# --------------------------------------------------------------------------------------------------
# exact resume

@pytest.fixture
def training_forwards(monkeypatch):
    """Every (input batch, loss) the model trains on, in order: one per micro-step."""
    seen = []
    forward = GPT.forward

    def recording_forward(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training:
            seen.append((idx.tolist(), loss.item()))
        return logits, loss

    monkeypatch.setattr(GPT, 'forward', recording_forward)
    return seen


def test_resumed_twice_sees_the_same_batches_and_losses_and_ends_bit_identical(
        tmp_path, char_data, training_forwards):
    # classic: batches and dropout come from random states the checkpoint does not hold
    overrides = dict(dropout=0.1, gradient_accumulation_steps=2, eval_interval=5)
    train.main(tiny_train_config(tmp_path / 'full', char_data, max_iters=12, **overrides))
    full = list(training_forwards)
    training_forwards.clear()
    # stop at 4 and 8, end at 12
    for stop, init_from in ((4, 'scratch'), (8, 'resume'), (12, 'resume')):
        train.main(tiny_train_config(tmp_path / 'split', char_data, max_iters=stop,
                                     init_from=init_from, **overrides))
    assert len(full) == 12 * 2
    # no batch replayed or skipped, the same dropout: the same losses
    assert training_forwards == full
    assert same_weights(weights(tmp_path / 'full'), weights(tmp_path / 'split'))


# --------------------------------------------------------------------------------------------------
# graceful stop

@pytest.mark.slow
def test_sigterm_saves_the_step_exits_143_and_resuming_ends_bit_identical(tmp_path, char_data):
    # classic: SIGTERM kills the run; every step since the last evaluation is lost
    cfg = tiny_train_config(tmp_path / 'stopped', char_data, dropout=0.1,
                            gradient_accumulation_steps=2, max_iters=10**6, eval_interval=10**6,
                            log_interval=1)
    proc = subprocess.Popen([sys.executable, 'train.py', *flags(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    for line in proc.stdout:
        if line.startswith('iter 2/'):  # mid-run
            break
    else:
        raise AssertionError(f"no 'iter 2/' log line: {proc.stderr.read()[-2000:]}")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = re.search(r"stopped by SIGTERM at iter (\d+), saved to .*ckpt\.pt; to continue, run "
                        r"the same command with --init_from=resume\n", out)
    k = int(stopped[1])
    assert k >= 2 and load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'))['iter_num'] == k
    # no evaluation on the way out, so no best.pt
    assert checkpoint_files(cfg.out_dir) == ['ckpt.pt']
    train.main(replace(cfg, max_iters=k + 2, init_from='resume'))
    train.main(replace(cfg, max_iters=k + 2, out_dir=str(tmp_path / 'full')))
    assert same_weights(weights(tmp_path / 'stopped'), weights(tmp_path / 'full'))


def signal_while_drawing(monkeypatch, step, signum, times=1):
    """Raise signum in this process (times over) while the first batch of step - 1 (0-based: the
    step that ends with iter_num == step) is drawn, at the start of that step."""
    get_batch = dataset.get_batch

    def get_batch_and_signal(data, block_size, batch_size, seed, rows=None, device='cpu'):
        if seed == dataset.batch_seed(1337, 'train', step - 1) and rows.start == 0:
            for _ in range(times):
                signal.raise_signal(signum)
        return get_batch(data, block_size, batch_size, seed, rows, device)

    monkeypatch.setattr(dataset, 'get_batch', get_batch_and_signal)


def handlers():
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_sigint_finishes_the_step_saves_it_and_restores_the_handlers(tmp_path, char_data,
                                                                     monkeypatch, capsys):
    # classic: Ctrl-C raises KeyboardInterrupt mid-step and nothing is saved
    before = handlers()
    signal_while_drawing(monkeypatch, step=3, signum=signal.SIGINT)
    result = train.main(tiny_train_config(tmp_path, char_data))
    # step 3 finished, then the run stopped
    assert result['stop_signal'] == signal.SIGINT and result['iter_num'] == 3
    assert load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))['iter_num'] == 3
    assert 'stopped by SIGINT at iter 3' in capsys.readouterr().out
    assert handlers() == before


def test_a_second_sigint_quits_at_once(tmp_path, char_data, monkeypatch):
    before = handlers()
    signal_while_drawing(monkeypatch, step=3, signum=signal.SIGINT, times=2)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_train_config(tmp_path, char_data))
    assert checkpoint_files(tmp_path) == []  # the first checkpoint would come at iter 10
    assert handlers() == before


# --------------------------------------------------------------------------------------------------
# crash-safe checkpoints

SAVE_HALF_THEN_HANG = '''
import io, sys, time, torch
import train
from configurator import cli
marker, real_save, calls = sys.argv.pop(1), torch.save, []

def save_half_then_hang(obj, f):  # the second checkpoint: write half of it, then wait to be killed
    calls.append(obj)
    if len(calls) < 2:
        return real_save(obj, f)
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
    f.flush()
    open(marker, 'w').close()
    time.sleep(600)

torch.save = save_half_then_hang
cli(train.main, train.TrainConfig)
'''


@pytest.mark.slow
def test_sigkill_while_saving_leaves_the_previous_checkpoint_to_resume_from(tmp_path, char_data):
    # classic: torch.save writes straight into ckpt.pt, so a kill mid-write leaves half a file there
    cfg = tiny_train_config(tmp_path / 'run', char_data, max_iters=10, eval_interval=5)
    marker = tmp_path / 'saving'
    proc = subprocess.Popen([sys.executable, '-c', SAVE_HALF_THEN_HANG, str(marker), *flags(cfg)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate()
    out = cfg.out_dir
    assert checkpoint_files(out) == ['best.pt', 'ckpt.pt', 'ckpt.pt.tmp']
    with pytest.raises(UserError, match='cannot be read'):
        load_checkpoint(os.path.join(out, 'ckpt.pt.tmp'))  # the half-written step-10 checkpoint
    assert load_checkpoint(os.path.join(out, 'ckpt.pt'))['iter_num'] == 5
    # resumed from ckpt.pt; the .tmp is overwritten
    assert train.main(replace(cfg, init_from='resume'))['iter_num'] == 10
    assert checkpoint_files(out) == ['best.pt', 'ckpt.pt', 'ckpt_prev.pt']
    assert load_checkpoint(os.path.join(out, 'ckpt_prev.pt'))['iter_num'] == 5


class Crash(Exception):
    pass


def test_a_crash_between_any_two_file_operations_of_a_save_leaves_loadable_checkpoints(tmp_path,
                                                                                      monkeypatch):
    # classic: no previous checkpoint is kept, and best.pt does not exist
    def ckpt(n):
        return {'format_version': FORMAT_VERSION, 'iter_num': n}

    def iter_of(out, name):
        return load_checkpoint(os.path.join(out, name))['iter_num']

    for crash_at in range(10):
        out = tmp_path / str(crash_at)
        save_checkpoint(ckpt(1), out, is_best=True)
        save_checkpoint(ckpt(2), out, is_best=False)
        calls = []

        def dies_at_crash_at(op):
            def wrapped(*args):
                calls.append(op)
                if len(calls) > crash_at:
                    raise Crash
                return op(*args)
            return wrapped

        with monkeypatch.context() as m:
            for name in ('link', 'replace', 'remove'):
                m.setattr(os, name, dies_at_crash_at(getattr(os, name)))
            try:
                save_checkpoint(ckpt(3), out, is_best=True)  # a new best
                finished = True
            except Crash:
                finished = False
        latest = iter_of(out, 'ckpt.pt')
        assert latest in (2, 3)  # the old checkpoint or the new one, whole
        # ckpt_prev.pt holds the checkpoint ckpt.pt held before
        assert iter_of(out, 'ckpt_prev.pt') in ((2,) if latest == 3 else (1, 2))
        assert iter_of(out, 'best.pt') in (1, 3)
        # what the crash left behind does not get in the way
        save_checkpoint(ckpt(4), out, is_best=False)
        assert checkpoint_files(out) == ['best.pt', 'ckpt.pt', 'ckpt_prev.pt']
        assert iter_of(out, 'ckpt.pt') == 4 and iter_of(out, 'ckpt_prev.pt') == latest
        if finished:
            break
    # link + replace (ckpt_prev.pt), replace (ckpt.pt), link + replace (best.pt)
    assert finished and crash_at == 5


# --------------------------------------------------------------------------------------------------
# non-finite loss

@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_naming_the_iteration_and_changes_no_file(tmp_path,
                                                                                  char_data):
    # classic: trains on through nan and saves the nan model over ckpt.pt at the next evaluation
    cfg = tiny_train_config(tmp_path, char_data, max_iters=5, eval_interval=5, warmup_iters=0,
                            log_interval=1)
    train.main(cfg)
    before = dir_snapshot(tmp_path)
    # lr 1e30 throws the weights to ~1e30 in one step; the next forward overflows to inf, then nan
    diverging = replace(cfg, init_from='resume', max_iters=10, learning_rate=1e30, decay_lr=False,
                        grad_clip=0.0)
    r = run_script('train.py', *flags(diverging))
    assert 'iter 6/' in r.stdout
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert r.stderr.startswith('error: the loss is not finite at iter 7 (lr 1.00e+30): the run '
                               'diverged and stopped without saving')
    after = dir_snapshot(tmp_path)
    # the checkpoints are untouched; only the metrics log has the steps logged before the divergence
    assert {k: v for k, v in after.items() if k != 'metrics.jsonl'} == \
        {k: v for k, v in before.items() if k != 'metrics.jsonl'}
    assert after['metrics.jsonl'][0].startswith(before['metrics.jsonl'][0])


# --------------------------------------------------------------------------------------------------
# safe loading

def test_every_checkpoint_written_loads_with_weights_only(tmp_path, char_data):
    # classic: no ckpt_prev.pt or best.pt, and no random states to restore
    train.main(tiny_train_config(tmp_path, char_data, max_iters=15, eval_interval=5))
    files = checkpoint_files(tmp_path)
    assert files == ['best.pt', 'ckpt.pt', 'ckpt_prev.pt']
    for name in files:
        ckpt = torch.load(os.path.join(tmp_path, name), weights_only=True)
        assert set(ckpt) == {'format_version', 'model', 'optimizer', 'scaler', 'model_args',
                             'config', 'iter_num', 'best_val_loss', 'vocab', 'rng',
                             'data_sha256', 'lora'}
        assert set(ckpt['rng']) == {'python', 'numpy', 'torch', 'cuda'}
    assert [load_checkpoint(os.path.join(tmp_path, f))['iter_num']
            for f in ('ckpt_prev.pt', 'ckpt.pt')] == [10, 15]


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / 'code_ran'

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)  # what unpickling would call

    torch.save({'format_version': FORMAT_VERSION, 'payload': Payload()}, tmp_path / 'ckpt.pt')
    with pytest.raises(UserError, match=r"ckpt\.pt cannot be read .*it is corrupt or not a "
                                        r"nanogpt checkpoint"):
        load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))
    assert not marker.exists()


@pytest.mark.slow
def test_a_compiled_run_saves_the_raw_model_and_resumes(tmp_path, char_data, monkeypatch):
    # classic: saves the compiled module's state_dict, whose keys all start with '_orig_mod.'
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python")
    compiled, compile = [], torch.compile

    def compile_eager(model):
        # the same OptimizedModule wrapper as inductor's (the source of '_orig_mod.'), without the
        # C++ compilation that takes minutes on a small CPU
        compiled.append(compile(model, backend='eager'))
        return compiled[-1]

    monkeypatch.setattr(torch, 'compile', compile_eager)
    cfg = tiny_train_config(tmp_path, char_data, compile=True, max_iters=2, eval_interval=2,
                            eval_iters=1)
    train.main(cfg)
    # what would be saved classically
    assert all(k.startswith('_orig_mod.') for k in compiled[0].state_dict())
    ckpt = load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))
    assert set(ckpt['model']) == set(GPT(GPTConfig(**ckpt['model_args'])).state_dict())
    model_from_checkpoint(ckpt)  # loads strictly: raises if a key is missing or unexpected
    assert train.main(replace(cfg, max_iters=3, init_from='resume'))['iter_num'] == 3
