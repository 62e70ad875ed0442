"""Config: defaults < config file < --key=value flags, with strict keys and types."""

import glob
import os
from dataclasses import dataclass

import pytest
import torch

from configurator import load_config
from conftest import REPO, run_script
from nanogpt import device
from nanogpt.device import resolve_compile, resolve_device, resolve_dtype, resolve_sample_dtype
from nanogpt.errors import UserError


@dataclass
class Cfg:
    max_iters: int = 100
    lr_decay_iters: int = 100
    learning_rate: float = 1e-3
    dataset: str = 'openwebtext'
    bias: bool = False
    top_k: int | None = 200
    compile: bool | str = 'auto'


def write(tmp_path, text):
    path = tmp_path / 'cfg.py'
    path.write_text(text)
    return str(path)


def test_no_arguments_give_the_defaults():
    assert load_config(Cfg, []) == Cfg()


def test_config_file_then_flags_in_order(tmp_path):
    path = write(tmp_path, "max_iters = 500\n"
                           "lr_decay_iters = max_iters  # sees earlier values\n"
                           "dataset = 'shakespeare_char'\n")
    cfg = load_config(Cfg, ['--max_iters=7', path, '--learning_rate=3e-4'])
    assert cfg.max_iters == 500  # the file came after the flag
    assert cfg.lr_decay_iters == 500 and cfg.dataset == 'shakespeare_char'
    assert cfg.learning_rate == 3e-4


def test_config_file_may_import_and_use_private_names(tmp_path):
    path = write(tmp_path, "import math\n"
                           "_steps = 2 ** 10\n"
                           "max_iters = _steps\n"
                           "learning_rate = math.sqrt(1e-6)\n")
    cfg = load_config(Cfg, [path])
    assert cfg.max_iters == 1024 and cfg.learning_rate == pytest.approx(1e-3)


def test_flag_values_are_python_literals():
    cfg = load_config(Cfg, ['--bias=True', '--learning_rate=1', '--dataset=shakespeare',
                            '--top_k=None', '--compile=False'])
    assert cfg.bias is True
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.dataset == 'shakespeare' and cfg.top_k is None and cfg.compile is False


def test_string_value_may_contain_equals_sign():
    assert load_config(Cfg, ['--dataset=a=b']).dataset == 'a=b'


def test_a_string_key_takes_a_value_that_reads_as_another_literal_as_its_text():
    assert load_config(Cfg, ['--dataset=2024']).dataset == '2024'  # not int 2024
    assert load_config(Cfg, ['--dataset=1,2']).dataset == '1,2'  # not the tuple (1, 2)
    assert load_config(Cfg, ['--compile=False']).compile is False  # bool | str: a bool still


@pytest.mark.parametrize('args, message', [
    (['--max_iter=5'], "unknown config key 'max_iter' (did you mean 'max_iters'?)"),
    (['--max_iters=5.5'], "config key 'max_iters' must be int, got float 5.5"),
    (['--max_iters=True'], "config key 'max_iters' must be int, got bool True"),  # a bool is no int
    (['--bias=1'], "config key 'bias' must be bool, got int 1"),
    (['--learning_rate=fast'], "config key 'learning_rate': cannot parse value 'fast'"),
    (['--dataset'], "flag '--dataset' must be written --key=value"),
    (['missing.py'], "config file 'missing.py' not found"),
])
def test_bad_flags_are_one_line_errors_naming_the_key(args, message):
    with pytest.raises(UserError) as e:
        load_config(Cfg, args)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_an_unknown_key_in_a_config_file_is_an_error_naming_the_file(tmp_path):
    path = write(tmp_path, "learning_rat = 1e-3\n")
    with pytest.raises(UserError, match=r"in .*cfg.py: unknown config key 'learning_rat' \(did you "
                                        r"mean 'learning_rate'\?\)"):
        load_config(Cfg, [path])


@pytest.mark.slow
def test_cli_error_is_one_line_without_traceback():
    r = run_script('train.py', '--batchsize=32')
    assert r.returncode == 2
    assert r.stderr == "error: unknown config key 'batchsize' (did you mean 'batch_size'?)\n"


def config_path(name):
    return os.path.join(REPO, 'config', name)


def test_the_shakespeare_char_configs_have_the_documented_shapes():
    from train import TrainConfig
    cfg = load_config(TrainConfig, [config_path('train_shakespeare_char.py'), '--batch_size=32',
                                    '--compile=False'])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size) == \
        (6, 6, 384, 256, 32)
    assert cfg.dropout == 0.2 and cfg.max_iters == 5000 and cfg.compile is False
    cfg = load_config(TrainConfig, [config_path('train_shakespeare_char_cpu.py')])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.max_iters) == \
        (4, 4, 128, 64, 12, 2000)


def test_every_shipped_config_loads_passes_the_checks_and_says_how_to_run_it(tmp_path,
                                                                             monkeypatch):
    from nanogpt.hf import GPT2_NAMES
    from train import TrainConfig, check_config
    names = sorted(os.path.basename(p) for p in glob.glob(config_path('*.py')))
    monkeypatch.chdir(tmp_path)
    for name in names:
        cfg = load_config(TrainConfig, [config_path(name)])
        if cfg.init_from not in ('scratch', 'resume', *GPT2_NAMES):
            # a run of ours to finetune, which the config's comment says how to train first
            os.makedirs(cfg.init_from)
            open(os.path.join(cfg.init_from, 'best.pt'), 'w').close()
        check_config(cfg)
        with open(config_path(name)) as f:
            assert f'train.py config/{name}' in f.read(), f'{name} has no command to run it'
    eval_configs = [f"eval_{name.replace('-', '_')}.py" for name in GPT2_NAMES]
    assert {'train_gpt2.py', 'finetune_shakespeare.py', *eval_configs} <= set(names)
    cfg = load_config(TrainConfig, [config_path('train_gpt2.py')])
    # ~0.5M tokens per step
    assert cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps == 491_520
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.max_iters, cfg.lr_decay_iters) == \
        (12, 12, 768, 600000, 600000)
    assert (cfg.learning_rate, cfg.min_lr, cfg.weight_decay, cfg.beta1, cfg.beta2) == \
        (6e-4, 6e-5, 0.1, 0.9, 0.95)
    for name, eval_config in zip(GPT2_NAMES, eval_configs):
        cfg = load_config(TrainConfig, [config_path(eval_config)])
        assert cfg.init_from == name and cfg.eval_only and cfg.dataset == 'openwebtext'
        assert not cfg.wandb_log
    cfg = load_config(TrainConfig, [config_path('finetune_shakespeare.py')])
    assert cfg.init_from in GPT2_NAMES and cfg.dataset == 'shakespeare' and not cfg.decay_lr
    assert cfg.learning_rate < 1e-4 and not cfg.always_save_checkpoint


def test_auto_device_is_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)
    assert resolve_device('auto') == 'cuda'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device('auto') == 'mps'
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    assert resolve_device('auto') == 'cpu'


def test_cpu_runs_fp32_uncompiled_by_default_and_bad_devices_are_refused():
    assert resolve_device('cpu') == 'cpu'
    assert resolve_dtype('auto', 'cpu') == 'float32'
    assert resolve_compile('auto', 'cpu') is False and resolve_compile(True, 'cpu') is True
    with pytest.raises(UserError, match='float16 needs CUDA'):
        resolve_dtype('float16', 'cpu')
    with pytest.raises(UserError, match='unknown device'):
        resolve_device('tpu')


def test_sampling_dtype_is_bf16_where_decoding_is_faster_in_it(monkeypatch):
    """bf16 with native bf16 at any batch size; on AVX2/AVX-512 CPUs without it, for up to 4 rows
    (vector products read half the bytes), fp32 from there on (bf16 matrix products are slow
    there)."""
    monkeypatch.setattr(device, 'cpu_has_native_bf16', lambda: True)
    assert resolve_sample_dtype('auto', 'cpu', batch_size=64) == 'bfloat16'
    monkeypatch.setattr(device, 'cpu_has_native_bf16', lambda: False)
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    assert resolve_sample_dtype('auto', 'cpu') == 'bfloat16'
    assert resolve_sample_dtype('auto', 'cpu', batch_size=4) == 'bfloat16'
    assert resolve_sample_dtype('auto', 'cpu', batch_size=5) == 'float32'
    # no vector units known
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'DEFAULT')
    assert resolve_sample_dtype('auto', 'cpu') == 'float32'
    assert resolve_sample_dtype('bfloat16', 'cpu', batch_size=64) == 'bfloat16'
    assert resolve_sample_dtype('float32', 'cpu') == 'float32'
    with pytest.raises(UserError, match='float16 needs CUDA'):
        resolve_sample_dtype('float16', 'cpu')


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512')
    cpuinfo.write_text('processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n')
    assert device.cpu_has_native_bf16(cpuinfo) is True
    cpuinfo.write_text('processor\t: 0\nflags\t\t: fpu avx2 avx512f\n')
    assert device.cpu_has_native_bf16(cpuinfo) is False
    assert device.cpu_has_native_bf16(tmp_path / 'none') is False  # no /proc/cpuinfo: not Linux
    # PyTorch's kernels: no AVX-512
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    cpuinfo.write_text('processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n')
    assert device.cpu_has_native_bf16(cpuinfo) is False
