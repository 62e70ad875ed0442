"""A newcomer's first minutes, as the README has them: --help on every script, sampling a run too
short to have a best.pt, a refusal under torchrun, and OpenAI's GPT-2 asked for with no network."""

import os
import time

import pytest

import bench
import chat
import eval as evaluate
import sample
import serve
import train
from configurator import cli, usage
from conftest import flags, run_script, tiny_train_config
from nanogpt.errors import UserError
from scripts import export_hf, plot

SCRIPTS = {train: train.TrainConfig, sample: sample.SampleConfig, evaluate: evaluate.EvalConfig,
           chat: chat.ChatConfig, serve: serve.ServeConfig, bench: bench.BenchConfig,
           export_hf: export_hf.ExportConfig, plot: plot.PlotConfig}


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda s: s.__name__)
def test_help_prints_the_commands_then_every_key_with_its_default_and_comment(script, capsys):
    with pytest.raises(SystemExit) as e:
        cli(script.main, SCRIPTS[script], ['--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith(script.__doc__.strip().splitlines()[0])  # the docstring's commands
    keys = [line.split('=')[0].strip() for line in out.splitlines() if line.startswith('  --')]
    assert keys == [f'--{k}' for k in SCRIPTS[script].__dataclass_fields__]


def test_help_gives_a_keys_comment_from_beside_it_or_above_it():
    text = usage(sample.SampleConfig, sample.__doc__)
    assert "  --num_samples=10  1 streams the text to the terminal;" in text
    assert "  --stop=''  end a sample at the first occurrence of this text" in text  # above it


@pytest.mark.slow
def test_help_as_typed_exits_0_before_importing_anything_heavy():
    r = run_script('train.py', '--help')
    assert r.returncode == 0 and '--batch_size=12' in r.stdout and not r.stderr


def test_a_run_with_no_best_pt_yet_is_sampled_from_its_ckpt_pt(tmp_path, char_data, capsys):
    train.main(tiny_train_config(tmp_path, char_data, max_iters=4, eval_interval=2))
    os.remove(tmp_path / 'best.pt')  # as a run stopped before its first evaluation leaves it
    samples = sample.main(sample.SampleConfig(out_dir=str(tmp_path), num_samples=2,
                                              max_new_tokens=5, device='cpu'))
    assert len(samples) == 2 and 'no best.pt' in capsys.readouterr().err


@pytest.mark.slow
def test_a_refusal_under_torchrun_is_one_line_on_every_rank(tmp_path, char_data):
    cfg = tiny_train_config(tmp_path, char_data, max_iters=2, gradient_accumulation_steps=2)
    train.main(cfg)  # the out_dir now holds a run: a new one there is refused
    r = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                   'train.py', *flags(cfg), timeout=120)
    assert r.returncode != 0
    assert r.stderr.count('error: ') == 2 and r.stderr.count('already holds a run') == 2
    assert 'gloo' not in r.stderr.lower() and 'train.py", line' not in r.stderr  # no traceback


def test_openai_gpt2_with_no_network_fails_fast_in_one_line(tmp_path, monkeypatch):
    pytest.importorskip('transformers')
    from nanogpt.hf import from_pretrained
    monkeypatch.setenv('HF_HOME', str(tmp_path))  # nothing cached
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # nothing listens there
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="cannot be reached"):
        from_pretrained('gpt2')
    assert time.perf_counter() - t0 < 10  # transformers alone retries for about a minute
