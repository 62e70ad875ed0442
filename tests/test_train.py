"""Training: the schedule, learning on real data, checkpoints and resume."""

import os
import re

import pytest

from conftest import max_diff, metrics, run_script, same_weights, tiny_train_config, weights
from nanogpt.checkpoint import load_checkpoint
from nanogpt.errors import UserError
from train import TrainConfig, get_lr, main


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(0, cfg) == pytest.approx(1e-3 / 11)  # above zero at step 0
    assert get_lr(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert get_lr(10, cfg) == pytest.approx(1e-3)  # peak right after warm-up
    assert get_lr(60, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # half way down the cosine
    assert get_lr(110, cfg) == pytest.approx(1e-4) and get_lr(500, cfg) == pytest.approx(1e-4)
    assert get_lr(60, TrainConfig(decay_lr=False, learning_rate=5e-4)) == 5e-4


@pytest.mark.slow
def test_tiny_model_learns_real_text(tmp_path, char_data):
    cfg = tiny_train_config(tmp_path, char_data, max_iters=200, lr_decay_iters=200,
                            eval_interval=200, eval_iters=10, n_embd=64, n_head=4, batch_size=16)
    at_init = tiny_train_config(tmp_path / 'init', char_data, eval_only=True, eval_iters=10)
    initial = main(at_init)['losses']['val']
    result = main(cfg)
    assert initial == pytest.approx(4.17, abs=0.1)  # ln(65): uniform over the vocabulary
    assert result['losses']['val'] < initial - 1.4  # ~2.5: it has learnt which letters follow which
    assert result['iter_num'] == 200


def test_checkpoints_are_saved_at_evals_and_after_the_last_step(tmp_path, char_data):
    result = main(tiny_train_config(tmp_path, char_data, max_iters=25, eval_interval=10))
    ckpt = load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))  # weights_only=True
    # 25 steps done, then a final eval
    assert ckpt['iter_num'] == 25 and result['iter_num'] == 25
    assert ckpt['model_args']['n_layer'] == 2 and ckpt['config']['max_iters'] == 25
    assert ckpt['vocab']['kind'] == 'char' and len(ckpt['vocab']['chars']) == 65
    best = load_checkpoint(os.path.join(tmp_path, 'best.pt'))
    assert best['best_val_loss'] == result['best_val_loss']


def test_evaluations_happen_every_eval_interval_and_at_step_0_unless_switched_off(tmp_path,
                                                                                 char_data):
    for at_start, expected in [(True, [0, 10, 20, 25]), (False, [10, 20, 25])]:
        out = tmp_path / str(at_start)
        main(tiny_train_config(out, char_data, max_iters=25, eval_interval=10,
                               eval_at_start=at_start))
        assert [r['iter'] for r in metrics(out) if 'val_loss' in r] == expected


def test_best_val_loss_only_goes_down_and_best_pt_keeps_the_best(tmp_path, char_data):
    # A learning rate this high makes the loss climb again after its first fall.
    cfg = tiny_train_config(tmp_path, char_data, learning_rate=0.3, warmup_iters=0, decay_lr=False,
                            max_iters=40, eval_interval=5, grad_clip=0.0)
    result = main(cfg)
    latest = load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))
    best = load_checkpoint(os.path.join(tmp_path, 'best.pt'))
    assert result['losses']['val'] > result['best_val_loss']  # the run got worse...
    assert best['iter_num'] < latest['iter_num']  # ...and best.pt is an earlier, better model
    assert latest['best_val_loss'] == best['best_val_loss'] == result['best_val_loss']


def test_resume_continues_at_the_saved_step_with_the_saved_weights(tmp_path, char_data):
    main(tiny_train_config(tmp_path, char_data, max_iters=10))
    saved = load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))
    result = main(tiny_train_config(tmp_path, char_data, max_iters=10, init_from='resume',
                                    eval_only=True))
    assert result['iter_num'] == 10
    assert result['best_val_loss'] == saved['best_val_loss']
    result = main(tiny_train_config(tmp_path, char_data, max_iters=20, init_from='resume'))
    assert result['iter_num'] == 20
    assert load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))['iter_num'] == 20


@pytest.mark.slow  # test_trust resumes twice, bit for bit, in the fast subset
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, char_data):
    overrides = dict(dropout=0.1, gradient_accumulation_steps=2, max_iters=20, eval_interval=10)
    main(tiny_train_config(tmp_path / 'full', char_data, **overrides))
    main(tiny_train_config(tmp_path / 'split', char_data, **{**overrides, 'max_iters': 10}))
    main(tiny_train_config(tmp_path / 'split', char_data, **overrides, init_from='resume'))
    assert same_weights(weights(tmp_path / 'full'), weights(tmp_path / 'split'))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, char_data):
    # 4 micro-steps of 4 sequences make the same step as 1 micro-step of those 16 sequences
    main(tiny_train_config(tmp_path / 'a', char_data, batch_size=16, gradient_accumulation_steps=1,
                           max_iters=3))
    main(tiny_train_config(tmp_path / 'b', char_data, batch_size=4, gradient_accumulation_steps=4,
                           max_iters=3))
    # equal up to fp32 summation order
    assert max_diff(weights(tmp_path / 'a'), weights(tmp_path / 'b')) < 1e-5


def test_resume_refuses_a_different_model_shape(tmp_path, char_data):
    main(tiny_train_config(tmp_path, char_data, max_iters=5, eval_interval=5))
    with pytest.raises(UserError, match=r"has n_embd=32 but this run asks for 64"):
        main(tiny_train_config(tmp_path, char_data, n_embd=64, init_from='resume'))


@pytest.mark.slow
def test_missing_dataset_names_the_prepare_script(tmp_path):
    r = run_script('train.py', '--dataset=shakespeare_nope', f'--out_dir={tmp_path}',
                   '--device=cpu')
    assert r.returncode == 2 and 'run `python data/shakespeare_nope/prepare.py` first' in r.stderr
    assert 'Traceback' not in r.stderr and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_training_from_the_command_line_logs_each_step_and_evaluation(tmp_path, char_data):
    r = run_script('train.py', 'config/train_shakespeare_char_cpu.py', f'--data_dir={char_data}',
                   f'--out_dir={tmp_path}', '--max_iters=4', '--eval_interval=2', '--eval_iters=2',
                   '--log_interval=1', '--n_layer=1', '--n_embd=32', '--n_head=2')
    assert r.returncode == 0, r.stderr
    logged = {row['iter']: row for row in metrics(tmp_path) if 'train_loss' in row}
    evals = {row['iter']: row for row in metrics(tmp_path) if 'val_loss' in row}
    # each logged step prints the loss the metrics log holds, the speed and the time left (no MFU
    # on a CPU: no data sheet gives its peak); the first step, which warms up, gives no time left
    assert re.search(rf"^iter 4/4 \(100%\): loss {logged[4]['train_loss']:.4f}, lr [0-9.e+-]+, "
                     r"[0-9.]+ ms, [0-9,]+ tok/s, peak mem [0-9.]+ GiB, eta 0m00s$", r.stdout,
                     re.MULTILINE)
    assert re.search(r"^iter 1/4 \(25%\): .* tok/s, peak mem .*, eta -$", r.stdout, re.MULTILINE)
    assert f"step 4: train loss {evals[4]['eval_train_loss']:.4f}, val loss " \
           f"{evals[4]['val_loss']:.4f}" in r.stdout
    assert load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))['iter_num'] == 4
