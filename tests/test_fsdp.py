"""FSDP2 under torchrun on the CPU (gloo): sharded parameters, gradients and optimizer state train
the model that one process trains on the same global batch, and its checkpoints are ordinary
ones."""

import dataclasses
import shutil

import pytest

import train
from conftest import fails, max_diff, run_script, same_weights, tiny_train_config, weights
from test_ddp import SETTINGS, torchrun


def fsdp_config(out_dir, data_dir, **overrides):
    return tiny_train_config(out_dir, data_dir, gradient_accumulation_steps=4,
                             **{**SETTINGS, 'parallelism': 'fsdp', **overrides})


def greedy_sample(out_dir):
    r = run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', '--temperature=0.0',
                   '--num_samples=1', '--max_new_tokens=40', '--start=ROMEO:')
    assert r.returncode == 0, r.stderr[-2000:]
    return [line for line in r.stdout.splitlines() if 'tokens/s' not in line]  # not the timing


@pytest.mark.slow
def test_two_fsdp_processes_learn_like_one_and_resume_exactly(tmp_path, char_data):
    two = fsdp_config(tmp_path / 'two', char_data)
    r = torchrun(2, two)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('saved checkpoint') == 2  # gathered, written once by process 0
    one = dataclasses.replace(two, out_dir=str(tmp_path / 'one'), parallelism='ddp')
    train.main(one)  # one process: no sharding at all
    assert max_diff(weights(tmp_path / 'two'), weights(tmp_path / 'one')) < 1e-5
    # the gathered checkpoint is an ordinary one: plain sample.py writes what the 1-process
    # model writes
    assert greedy_sample(tmp_path / 'two') == greedy_sample(tmp_path / 'one')

    # stopped at step 5, resumed by one plain process: where the 1-process run ends
    half = dataclasses.replace(two, out_dir=str(tmp_path / 'half'), max_iters=5)
    assert torchrun(2, half).returncode == 0
    shutil.copytree(tmp_path / 'half', tmp_path / 'moved')
    train.main(dataclasses.replace(one, out_dir=str(tmp_path / 'moved'), init_from='resume'))
    assert max_diff(weights(tmp_path / 'moved'), weights(tmp_path / 'one')) < 1e-5
    # resumed on 2 FSDP processes instead: the uninterrupted FSDP run, bit for bit
    r = torchrun(2, dataclasses.replace(half, max_iters=10, init_from='resume'))
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_weights(weights(tmp_path / 'half'), weights(tmp_path / 'two'))


@pytest.mark.slow
def test_lora_with_activation_checkpointing_under_fsdp_learns_like_one_process(
        tmp_path, trained_run, char_data):
    lora = dict(init_from=str(trained_run), lora_rank=4, lora_alpha=8.0, lora_targets='all',
                learning_rate=1e-2)
    two = fsdp_config(tmp_path / 'two', char_data, activation_checkpointing=True, **lora)
    r = torchrun(2, two)
    assert r.returncode == 0, r.stderr[-3000:]
    train.main(fsdp_config(tmp_path / 'one', char_data, parallelism='ddp', **lora))
    a, b = weights(tmp_path / 'two'), weights(tmp_path / 'one')
    assert any('lora_B' in k for k in a) and max_diff(a, b) < 1e-5


@pytest.mark.parametrize('extra, says', [
    (['--parallelism=zero3'], "parallelism must be 'ddp' or 'fsdp'"),
    (['--parallelism=fsdp', '--optimizer=muon'], "optimizer='adamw'"),
])
def test_fsdp_mistakes_are_one_line_errors(extra, says, tmp_path, char_data, capsys):
    args = [f'--out_dir={tmp_path}', f'--data_dir={char_data}', '--dataset=shakespeare_char',
            '--device=cpu', *extra]
    assert says in fails(train, train.TrainConfig, args, tmp_path, capsys)
