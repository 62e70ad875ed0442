"""
Configuration: defaults < config file < --key=value flags, applied left to right.

Each script declares its knobs as a dataclass of defaults and ends with `cli(main, Config)`:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

A config file is plain Python run in its own namespace, seeded with the values so far (so a file can
say `lr_decay_iters = max_iters`); every public name it binds must be a known key. A flag's value is a
Python literal (`--lr=3e-4`, `--bias=False`); a bare word is taken as a string only for string keys.
An int may stand for a float, a bool never for an int. Mistakes are a one-line error naming the key.

This module also turns device='auto', dtype='auto' and compile='auto' into what the machine supports.
"""

import ast
import dataclasses
import difflib
import os
import sys
import time
import types
import typing
from contextlib import nullcontext


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, ...): printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------------------
# config files and flags

def _allowed_types(cls, key):
    hint = typing.get_type_hints(cls)[key]
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _check_type(cls, key, value):
    """Return value converted to the key's declared type, or raise UserError."""
    allowed = _allowed_types(cls, key)
    for t in allowed:
        if t is type(None) and value is None:
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = ' or '.join('None' if t is type(None) else t.__name__ for t in allowed)
    raise UserError(f"config key '{key}' must be {names}, got {type(value).__name__} {value!r}")


def _unknown_key(cls, key):
    keys = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(keys)})"
    return UserError(f"unknown config key '{key}'{hint}")


def _parse_flag_value(cls, key, text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if str in _allowed_types(cls, key):
            return text  # a bare word, e.g. --device=cpu
        raise UserError(f"config key '{key}': cannot parse value {text!r}") from None


def load_config(cls, args):
    """Build a `cls` dataclass from its defaults, then each arg in order: a config file path, or
    --key=value. Returns the config object; raises UserError on any mistake."""
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    for arg in args:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise UserError(f"config file '{arg}' not found (flags are written --key=value)")
            namespace = dict(values)
            with open(arg) as f:
                code = compile(f.read(), arg, 'exec')
            exec(code, namespace)  # run the file in its own namespace, never in ours
            for key, value in namespace.items():
                if key.startswith('_') or isinstance(value, types.ModuleType):
                    continue  # __builtins__, imports and private helpers are not config
                if key not in values:
                    raise UserError(f"in {arg}: " + str(_unknown_key(cls, key)))
                values[key] = _check_type(cls, key, value)
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise UserError(f"flag '{arg}' must be written --key=value")
            if key not in values:
                raise _unknown_key(cls, key)
            values[key] = _check_type(cls, key, _parse_flag_value(cls, key, text))
    return cls(**values)


def print_config(cfg):
    print('config: ' + ', '.join(f'{k}={v!r}' for k, v in dataclasses.asdict(cfg).items()))


def cli(main, cls=None, argv=None):
    """Entry point of every script: parse argv into a `cls` config, run main(cfg), and turn a
    UserError into one line on stderr and exit status 2. Without cls, main() parses its own args."""
    try:
        if cls is None:
            return main()
        cfg = load_config(cls, sys.argv[1:] if argv is None else argv)
        return main(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------
# device, dtype, compile

def resolve_device(device):
    """'auto' picks cuda, then Apple's mps, then cpu."""
    import torch
    if device == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
            return 'mps'
        return 'cpu'
    device_type = device.split(':')[0]
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but CUDA is not available (try --device=cpu)")
    if device_type == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f"device '{device}' asked for, but mps is not available (try --device=cpu)")
    if device_type not in ('cuda', 'mps', 'cpu'):
        raise UserError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    return device


def resolve_dtype(dtype, device):
    """'auto': bf16 on CUDA that supports it, else fp16 on CUDA, else fp32. fp16 is refused off CUDA,
    where there is no GradScaler to keep its small gradients from underflowing."""
    import torch
    device_type = device.split(':')[0]
    if dtype == 'auto':
        if device_type == 'cuda':
            return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
        return 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise UserError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    if dtype == 'float16' and device_type != 'cuda':
        raise UserError(f"dtype float16 needs CUDA; on {device_type} use --dtype=bfloat16 or float32")
    return dtype


def cpu_has_native_bf16(cpuinfo='/proc/cpuinfo'):
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX, read from the flags in Linux's
    /proc/cpuinfo; False elsewhere). Without it a bf16 matmul converts to fp32 as it goes."""
    import torch
    if torch.backends.cpu.get_cpu_capability() != 'AVX512':  # the kernels PyTorch picked for this CPU
        return False
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def resolve_sample_dtype(dtype, device, batch_size=1):
    """dtype for generation. A decode step reads every weight for only batch_size rows, so it is bound
    by memory bandwidth, and bf16 weights halve the bytes (prefills stay in fp32: GPT.generate_stream).
    'auto' is bf16 where that is faster, else fp32: on CUDA with bf16; on CPUs with native bf16; and on
    x86 CPUs with AVX2 or AVX-512 for up to 4 rows, whose bf16 matrix-vector kernels convert to fp32 as
    they read (one row: 1.7x fp32's speed on a Zen 3; from 8 rows a bf16 matrix product takes a slow
    path there and fp32 wins). Training's 'auto' stays fp32 on the CPU. Other values as in resolve_dtype."""
    import torch
    if dtype != 'auto':
        return resolve_dtype(dtype, device)
    device_type = device.split(':')[0]
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float32'
    if device_type == 'cpu' and (cpu_has_native_bf16() or batch_size <= 4 and
                                 torch.backends.cpu.get_cpu_capability() in ('AVX2', 'AVX512')):
        return 'bfloat16'
    return 'float32'


def resolve_compile(compile, device):
    """'auto' compiles on CUDA only: on CPU and mps compiling costs more time than it saves
    for the small models trained there."""
    if compile == 'auto':
        return device.split(':')[0] == 'cuda'
    if not isinstance(compile, bool):
        raise UserError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile


def autocast_context(device, dtype):
    """Mixed precision for the forward pass: weights stay fp32, matmuls run in dtype."""
    import torch
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=getattr(torch, dtype))


# Dense bf16/fp16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets, to turn FLOP/s into MFU.
GPU_PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'A10': 125e12,
                  'RTX 4090': 165e12, 'RTX 3090': 71e12, 'V100': 125e12, 'T4': 65e12}


def peak_flops(device, dtype='float32'):
    """The FLOP/s that MFU is measured against: the data-sheet peak of a known GPU (A100 if unknown),
    or on CPU and mps a quick measurement of this machine's own matmul throughput (~0.2 s)."""
    import torch
    device_type = device.split(':')[0]
    if device_type == 'cuda':
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 312e12)
    n = 1024
    tdtype = torch.float32 if dtype == 'float32' else getattr(torch, dtype)
    a = torch.full((n, n), 0.5, device=device, dtype=tdtype)  # not randn: that would move the global RNG
    b = torch.full((n, n), 0.5, device=device, dtype=tdtype)
    best = float('inf')
    for _ in range(5):
        t0 = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for the result
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best
