"""
The device a script runs on: turning device/dtype/compile 'auto' into what this machine supports,
mixed precision (autocast), TF32 and threads, and the peak FLOP/s that MFU is measured against.

Every script calls setup() once and reads what it needs from the result:

    dev = setup(cfg.device, cfg.dtype, cfg.compile)
    with dev.autocast:
        logits, loss = model(x, y)
"""

import ctypes
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nanogpt.errors import UserError


def resolve_device(device):
    """'auto' picks cuda, then Apple's mps, then cpu."""
    if device == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
            return 'mps'
        return 'cpu'
    device_type, _, index = device.partition(':')
    if device_type not in ('cuda', 'mps', 'cpu'):
        raise UserError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but CUDA is not available "
                        "(try --device=cpu)")
    if device_type == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f"device '{device}' asked for, but mps is not available (try --device=cpu)")
    n_gpus = torch.cuda.device_count() if device_type == 'cuda' else 0
    if n_gpus and index and not (index.isdigit() and int(index) < n_gpus):
        raise UserError(f"device '{device}': this machine has {n_gpus} GPU(s), "
                        f"cuda:0 to cuda:{n_gpus - 1}")
    return device


def cuda_has_bf16(device):
    """Whether the GPU multiplies bf16 natively: Ampere (compute capability 8.0) or newer. Not
    torch.cuda.is_bf16_supported(), which by default also counts the slow emulation of V100/T4, and
    looks at the current GPU rather than the one asked for."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtype(dtype, device):
    """'auto': bf16 on CUDA that supports it, else fp16 on CUDA, else fp32. fp16 is refused off
    CUDA, where there is no GradScaler to keep its small gradients from underflowing."""
    device_type = device.split(':')[0]
    if dtype == 'auto':
        if device_type == 'cuda':
            return 'bfloat16' if cuda_has_bf16(device) else 'float16'
        return 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise UserError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    if dtype == 'float16' and device_type != 'cuda':
        raise UserError("dtype float16 needs CUDA; "
                        f"on {device_type} use --dtype=bfloat16 or float32")
    return dtype


def cpu_has_native_bf16(cpuinfo='/proc/cpuinfo'):
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX, read from the flags in
    Linux's /proc/cpuinfo; False elsewhere).
    Without it a bf16 matmul converts to fp32 as it goes."""
    if torch.backends.cpu.get_cpu_capability() != 'AVX512':  # PyTorch's kernel choice for this CPU
        return False
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(':', 1)[1].split()
                          for line in f if line.startswith('flags')), [])
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def resolve_sample_dtype(dtype, device, batch_size=1):
    """dtype for generation. A decode step reads every weight for only batch_size rows, so it is
    bound by memory bandwidth, and bf16 weights halve the bytes (prefills stay in fp32: see
    generation.py). 'auto' is bf16 where that is faster, else fp32: on CUDA with bf16; on CPUs with
    native bf16; and on x86 CPUs with AVX2 or AVX-512 for a few rows, whose bf16 matrix-vector
    kernels convert to fp32 as they read, while a bf16 matrix product of many rows takes a slow path
    without bf16 units (docs/sampling.md has the measurements). Other values as in resolve_dtype."""
    if dtype != 'auto':
        return resolve_dtype(dtype, device)
    device_type = device.split(':')[0]
    if device_type == 'cuda':
        return 'bfloat16' if cuda_has_bf16(device) else 'float32'
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


# decode steps from which compiling the decode step pays for itself: on a 2-core CPU compiling a
# run's two graphs (decode, refill) took ~42 s the first time and ~20 s once Inductor's kernel
# cache had them, and saved ~2.7 ms a step in bf16 (`auto`'s dtype there), so a run breaks even
# at ~16,000 steps (docs/sampling.md); shorter runs stay eager
COMPILE_MIN_STEPS = 20_000


def resolve_decode_compile(compile, device, steps=None, rows=1):
    """Whether to compile the decode step (generation.compile_decode). 'auto': for a run of
    `steps` decode steps (sample.py: max_new_tokens; chat.py: a reply's), when steps >=
    COMPILE_MIN_STEPS; for a server (steps None) on CUDA, where a step replays as one CUDA graph.
    Not for a server on a CPU: compiling its buckets took ~100 s and 16 rows were no faster
    (docs/serving.md); nor for more than 4 rows on a CPU (at 16 rows the compiled step was no
    faster in fp32 or bf16, docs/sampling.md)."""
    if compile == 'auto':
        if device.split(':')[0] == 'cpu' and rows > 4:
            return False
        if steps is None:
            return device.startswith('cuda')
        return steps >= COMPILE_MIN_STEPS
    if not isinstance(compile, bool):
        raise UserError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile


def autocast_context(device, dtype):
    """Mixed precision for the forward pass: weights stay fp32, matmuls run in dtype."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=getattr(torch, dtype))


@dataclass
class Device:
    device: str  # 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str  # 'float32', 'bfloat16' or 'float16': what autocast computes matmuls in
    compile: bool  # whether to torch.compile the model
    autocast: object  # a reusable context manager: `with dev.autocast:` around forward passes

    @property
    def type(self):
        return self.device.split(':')[0]


def setup(device='auto', dtype='auto', compile=False, sample_rows=None, threads=0):
    """Resolve device, dtype and compile, and set up the process for them. sample_rows: the dtype
    is chosen for generating that many rows at once (resolve_sample_dtype) rather than for
    training. threads: PyTorch's CPU threads (0 keeps its default, one per core)."""
    device = resolve_device(device)
    dtype = (resolve_dtype(dtype, device) if sample_rows is None
             else resolve_sample_dtype(dtype, device, sample_rows))
    if device.startswith('cuda'):
        # make cuda:N the current GPU, so that nothing (a context, a kernel) lands on GPU 0
        torch.cuda.set_device(device)
        # fp32 matmuls on tensor cores, 10-bit mantissa
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if threads:
        torch.set_num_threads(threads)
    if device == 'cpu':
        return_freed_memory()
    return Device(device, dtype, resolve_compile(compile, device), autocast_context(device, dtype))


def return_freed_memory():
    """Make glibc (Linux) give every freed allocation of 4 MiB or more back to the OS at once. By
    default it serves large allocations from its heap once a few have been freed (its mmap
    threshold rises to 32 MiB) and keeps what is freed there, so a CPU training step's activations
    stay resident after backward (a 12-layer step: 6.21 GiB peak, 5.41 GiB with this setting;
    docs/finetuning.md).
    A fixed threshold maps each large tensor on its own; mapping and zeroing its pages costs little
    beside the matmuls that fill it, and smaller tensors (all of the CPU recipe's) are left as
    they were."""
    try:
        ctypes.CDLL('libc.so.6').mallopt(-3, 4 * 2**20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: macOS, musl
        pass


def check_memory(n_params, device, bytes_per_param=16):
    """Refuse, in one line with the estimate, a model whose training state cannot fit in the memory
    free on device, before any of it is allocated (where it would end in an allocator traceback or
    the OOM killer). 16 bytes a parameter: fp32 weights, gradients and AdamW's two moments (4 for
    a LoRA model's frozen weights); activations come on top (memory.py estimates them)."""
    if device.startswith('cuda'):
        free = torch.cuda.mem_get_info(device)[0]
    elif device == 'cpu' and hasattr(os, 'sysconf'):
        free = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    else:
        return
    need = n_params * bytes_per_param
    if need > free:
        raise UserError(f"a model of {n_params / 1e6:,.1f}M parameters needs "
                        f"~{need / 2**30:,.1f} GiB for its weights, gradients and optimizer "
                        f"state, more than the {free / 2**30:,.1f} GiB free on {device}: "
                        "make it smaller")


def reset_peak_memory(device):
    """Measure peak_memory from now on."""
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats(device)
    elif device == 'cpu' and os.path.exists('/proc/self/clear_refs'):
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # Linux: VmHWM, the peak resident memory, restarts from the current
        except OSError:
            pass


def peak_memory(device):
    """The most memory in use since reset_peak_memory, in bytes: on a GPU what PyTorch's tensors
    took (its allocator's count), on a CPU the process's peak resident memory (Linux's VmHWM:
    everything, the Python interpreter included); None where neither is known (mps, macOS)."""
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated(device)
    if device == 'cpu' and os.path.exists('/proc/self/status'):
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024  # kB
    return None


# Dense tensor-core peaks in FLOP/s from NVIDIA's data sheets, to turn FLOP/s into MFU: (bf16/fp16,
# tf32, fp32 without tensor cores). Matched to torch.cuda.get_device_name as whole words, most
# specific first ('H100 PCIe' before 'H100', 'H200' before 'H20'; 'RTX A1000' is no 'A100').
GPU_PEAK_FLOPS = [
    ('B200', 2250e12, 1100e12, 80e12), ('H200', 989e12, 494e12, 67e12),
    ('H100 PCIe', 756e12, 378e12, 51e12), ('H100 NVL', 835e12, 418e12, 60e12),
    ('H100', 989e12, 494e12, 67e12), ('H20', 148e12, 74e12, 44e12),
    ('A100', 312e12, 156e12, 19.5e12), ('A10', 125e12, 62.5e12, 31.2e12),
    ('L40S', 362e12, 183e12, 91.6e12), ('L4', 121e12, 60e12, 30.3e12),
    ('RTX 4090', 165e12, 82.6e12, 82.6e12), ('RTX 3090', 71e12, 35.6e12, 35.6e12),
    ('V100', 125e12, None, 15.7e12), ('T4', 65e12, None, 8.1e12)]


def gpu_peak_flops(name, dtype='bfloat16', tf32=True):
    """The data-sheet peak of the GPU called `name` for matmuls in dtype (fp32 with TF32 or not),
    or None for a GPU not in the table."""
    for model, half, tf32_peak, fp32 in GPU_PEAK_FLOPS:
        if re.search(rf'\b{model}\b', name):
            if dtype != 'float32':
                return half
            return tf32_peak if tf32 and tf32_peak else fp32
    return None


def peak_flops(device, dtype='float32'):
    """The FLOP/s that MFU is measured against: on CUDA the data-sheet peak of the GPU for dtype
    (None for an unknown GPU: MFU is then not shown); on CPU and mps a measurement of this machine's
    own matmul throughput (the best of ten 1024 x 1024 products), for bench.py, which runs it on an
    otherwise idle machine."""
    device_type = device.split(':')[0]
    if device_type == 'cuda':
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype,
                              torch.backends.cuda.matmul.allow_tf32)
    n = 1024
    tdtype = getattr(torch, dtype)
    # not randn: that would move the global RNG
    a = torch.full((n, n), 0.5, device=device, dtype=tdtype)
    b = torch.full((n, n), 0.5, device=device, dtype=tdtype)
    best = float('inf')
    for _ in range(10):
        t0 = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for the result
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def memory_bandwidth(device, mib=256):
    """Bytes per second this machine's memory moves: the best of ten copies of a tensor of `mib`
    MiB, larger than any cache, counting what is read and what is written. What a decode step, which
    reads every weight once for all its rows, is bound by."""
    a = torch.ones(mib * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    best = float('inf')
    for _ in range(10):
        t0 = time.perf_counter()
        b.copy_(a)
        b[-1].item()  # waits for the copy
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best
