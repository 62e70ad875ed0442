"""Multi-process training with torchrun and DistributedDataParallel on the CPU (gloo backend): the
result depends on the total batch, not on how many processes share it."""

import dataclasses
import os

import pytest

from conftest import flags, max_diff, run_script, tiny_train_config, weights
from nanogpt.checkpoint import load_checkpoint
from train import main as train

# dropout 0: each process draws its own dropout masks, the only thing that may differ with world
# size
SETTINGS = dict(max_iters=10, lr_decay_iters=10, eval_interval=5, eval_iters=2, log_interval=5,
                dropout=0.0)


def torchrun(nproc, cfg):
    return run_script('-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                      'train.py', *flags(cfg), timeout=120)


@pytest.mark.slow
def test_two_processes_learn_like_one_and_resume_on_one(tmp_path, char_data):
    # 2 processes x 2 micro-steps == 1 process x 4 micro-steps, step for step
    two = tiny_train_config(tmp_path / 'two', char_data, gradient_accumulation_steps=4, **SETTINGS)
    r = torchrun(2, two)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('2 process(es)') == 1  # only rank 0 prints
    assert r.stdout.count('saved checkpoint') == 2  # steps 5 and 10, written once each
    assert sorted(os.listdir(tmp_path / 'two')) == ['best.pt', 'ckpt.pt', 'ckpt_prev.pt',
                                                    'metrics.jsonl']
    steps = [line for line in r.stdout.splitlines() if line.startswith('step ')]
    first, last = (float(s.split('val loss ')[1].split(',')[0]) for s in (steps[0], steps[-1]))
    assert last < first - 0.3  # the loss falls (4.17 -> ~3.74 in 10 steps)

    one = tiny_train_config(tmp_path / 'one', char_data, gradient_accumulation_steps=4, **SETTINGS)
    train(one)
    assert max_diff(weights(tmp_path / 'two'), weights(tmp_path / 'one')) < 1e-5

    # started on 2 processes, stopped at step 5, resumed on 1: ends where the 1-process run ended
    half = tiny_train_config(tmp_path / 'moved', char_data, gradient_accumulation_steps=4,
                             **{**SETTINGS, 'max_iters': 5})
    r = torchrun(2, half)
    assert r.returncode == 0, r.stderr[-3000:]
    train(dataclasses.replace(one, out_dir=str(tmp_path / 'moved'), init_from='resume'))
    assert load_checkpoint(os.path.join(tmp_path, 'moved', 'ckpt.pt'))['iter_num'] == 10
    assert max_diff(weights(tmp_path / 'moved'), weights(tmp_path / 'one')) < 1e-5


@pytest.mark.slow
def test_accumulation_must_divide_by_the_number_of_processes(tmp_path, char_data):
    cfg = tiny_train_config(tmp_path, char_data, gradient_accumulation_steps=3, **SETTINGS)
    r = torchrun(2, cfg)
    assert r.returncode != 0
    assert 'error: gradient_accumulation_steps (3) must be divisible by the number of processes ' \
           '(2)' in r.stderr
    assert not os.path.exists(tmp_path / 'ckpt.pt')
