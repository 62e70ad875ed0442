"""
The GPU check: every CUDA path of the project run once on this machine's GPU, in at most ~8
minutes, with one summary table at the end (copy it into docs/gpu.md with the GPU's name, the date
and the command).

    python scripts/gpu_check.py                      # on a machine with one CUDA GPU
    python scripts/gpu_check.py --cpu=True           # the same steps, tiny, on the CPU (CI)

Each step runs the scripts a user runs, as a user runs them (a subprocess each), in a temporary
folder: the baby GPT (config/train_shakespeare_char.py) in bf16 + torch.compile, fp16 with a
GradScaler and a resume (from its own checkpoint and from the bf16 one), fp32 with TF32, torchrun
with one process (NCCL start and shutdown), sampling tokens/s with the KV cache (bf16 and fp32, 1
and 10 rows, eager and compiled decode steps), eval.py, and bench.py on GPT-2 124M (padded
vocabulary, compiled). Tiny Shakespeare comes from data/shakespeare_char/input.txt,
$NANOGPT_SHARED_DATA/tinyshakespeare/input.txt or --input.
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import cli  # noqa: E402
from nanogpt.run_dir import read_metrics  # noqa: E402

# the baby GPT's steps on a GPU; on the CPU (--cpu) a tiny model, to check the plumbing only
GPU = dict(steps=300,
           baby=['config/train_shakespeare_char.py', '--eval_iters=20', '--log_interval=10'],
           bench=['config/train_gpt2.py', '--batch_size=12', '--gradient_accumulation_steps=1',
                  '--compile=True', '--bench_iters=20', '--dtype=bfloat16'],
           sample_tokens=500)
CPU = dict(steps=12,
           baby=['config/train_shakespeare_char.py', '--device=cpu', '--n_layer=2', '--n_head=2',
                 '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=2',
                 '--log_interval=2'],
           bench=['config/train_gpt2.py', '--device=cpu', '--n_layer=1', '--n_head=2',
                  '--n_embd=32', '--block_size=32', '--batch_size=2',
                  '--gradient_accumulation_steps=1', '--compile=False', '--bench_iters=2',
                  '--bench_warmup=1'],
           sample_tokens=20)


def run(args, log, env=None):
    """Run a command from the repository's root, its output appended to the log file.
    Returns (ok, output, seconds)."""
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    dt = time.perf_counter() - t0
    with open(log, 'a') as f:
        f.write(f"$ {' '.join(args)}\n{r.stdout}{r.stderr}\n[exit {r.returncode}, {dt:.1f} s]\n\n")
    return r.returncode == 0, r.stdout + r.stderr, dt


def train_summary(out_dir):
    """Steady-state ms/iter and MFU (medians of the last quarter of the log lines), and the first
    and last val loss."""
    rows = read_metrics(out_dir)
    steps = [r for r in rows if 'ms_per_iter' in r][-max(1, len(rows) // 4):]
    ms = sorted(r['ms_per_iter'] for r in steps)[len(steps) // 2]
    mfus = sorted(r['mfu'] for r in steps if 'mfu' in r)  # none off CUDA
    mfu = f"MFU {100 * mfus[len(mfus) // 2]:.1f}%" if mfus else 'no MFU'
    vals = [r['val_loss'] for r in rows if 'val_loss' in r]
    return f"{ms:.1f} ms/iter, {mfu}, val {vals[0]:.3f} -> {vals[-1]:.3f}", vals


@dataclass
class GpuCheckConfig:
    cpu: bool = False  # True: a tiny dry run on the CPU (CI)
    input: str = ''  # tiny Shakespeare input.txt ('': see the docstring)
    work_dir: str = ''  # where runs go ('': a temporary folder)


def main(cfg):
    p = CPU if cfg.cpu else GPU
    shared = os.environ.get('NANOGPT_SHARED_DATA', os.path.join(REPO, '..', 'shared', 'data'))
    candidates = [cfg.input, os.path.join(REPO, 'data', 'shakespeare_char', 'input.txt'),
                  os.path.join(shared, 'tinyshakespeare', 'input.txt')]
    text = next((c for c in candidates if c and os.path.isfile(c)), None)
    if text is None:
        sys.exit("error: no tiny Shakespeare: run `python data/shakespeare_char/prepare.py` "
                 "or pass --input")
    work = cfg.work_dir or tempfile.mkdtemp(prefix='gpu_check_')
    log = os.path.join(work, 'gpu_check.log')
    py = sys.executable
    data = os.path.join(work, 'data')
    results = []  # (check, ok, figures)

    def check(name, ok, figures=''):
        results.append((name, ok, figures))
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {figures}", flush=True)

    ok, _, _ = run([py, 'data/shakespeare_char/prepare.py', '--input', text, '--out_dir', data],
                   log)
    check('prepare shakespeare_char', ok)
    n = p['steps']
    baby = [py, 'train.py', *p['baby'], f'--data_dir={data}', f'--max_iters={n}',
            f'--lr_decay_iters={n}', f'--eval_interval={n // 2}', '--warmup_iters=10']

    def train(name, out_dir, *flags, env=None, cmd=baby):
        ok, out, dt = run([*cmd, f'--out_dir={os.path.join(work, out_dir)}', *flags], log, env)
        figures = (train_summary(os.path.join(work, out_dir))[0] if ok
                   else out.strip().splitlines()[-1:])
        check(name, ok, f"{figures}, {dt:.0f} s wall" if ok else figures)
        return ok

    gpu_dtype = (lambda d: '--dtype=float32') if cfg.cpu else (lambda d: f'--dtype={d}')
    train(f'baby GPT, bf16 + compile, {n} steps', 'bf16', gpu_dtype('bfloat16'),
          *([] if cfg.cpu else ['--compile=True']))
    half = n // 2
    if train(f'fp16 + GradScaler, {half} steps', 'fp16', gpu_dtype('float16'),
             f'--max_iters={half}'):
        train(f'fp16 resumed to {n}', 'fp16', gpu_dtype('float16'), '--init_from=resume')
    train(f'fp16 resumed from the bf16 run, to {n + half}', 'bf16', gpu_dtype('float16'),
          '--init_from=resume', f'--max_iters={n + half}')
    train(f'fp32 with TF32, {half} steps', 'fp32', '--dtype=float32', f'--max_iters={half}')
    torchrun = [py, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                *baby[1:]]
    train(f'torchrun, 1 process ({"gloo" if cfg.cpu else "NCCL"})', 'ddp', gpu_dtype('bfloat16'),
          f'--max_iters={half}', cmd=torchrun)

    ckpt_dir = os.path.join(work, 'bf16')
    for rows in (1, 10):
        ok, out, _ = run([py, 'scripts/bench_sample.py', f'--out_dir={ckpt_dir}', '--use_cache=on',
                          '--dtypes=bfloat16,float32', f'--batch_size={rows}', '--repeats=2',
                          f"--max_new_tokens={p['sample_tokens']}",
                          *(['--device=cpu'] if cfg.cpu else [])], log)
        # eager and compiled decode steps (CUDA graphs on a GPU), each in bf16 and fp32
        speeds = re.findall(r'KV cache, (\w+(?:, compiled)?): ([\d.]+) tokens/s', out)
        check(f'sampling, KV cache, {rows} row(s)', ok and len(speeds) == 4,
              ', '.join(f'{d} {float(s):,.0f} tok/s' for d, s in speeds))
    ok, out, _ = run([py, 'eval.py', f'--out_dir={ckpt_dir}', '--bleu_samples=4',
                      '--bleu_tokens=16',
                      *(['--device=cpu', '--max_tokens=2000'] if cfg.cpu else [])], log)
    loss = re.search(r'loss \(nats/token\)\s+([\d.]+)', out)
    check('eval.py, whole val split', ok and loss is not None,
          f'val loss {loss.group(1)}' if loss else '')
    ok, out, _ = run([py, 'bench.py', *p['bench']], log)
    figures = re.search(r'median ([\d.]+) ms/iter.*?([\d,]+) tokens/s, MFU ([\d.]+)%', out)
    name = ' (tiny on the CPU)' if cfg.cpu else ', padded vocab, compiled'
    check(f'bench.py, GPT-2 124M shape{name}', ok and figures is not None,
          f'{figures.group(1)} ms/iter, {figures.group(2)} tok/s, MFU {figures.group(3)}%'
          if figures else '')

    device = 'CPU (dry run)' if cfg.cpu else subprocess.run(
        [py, '-c', 'import torch; print(torch.cuda.get_device_name(), torch.__version__)'],
        capture_output=True, text=True).stdout.strip()
    print(f"\nGPU check on {device}, {time.strftime('%Y-%m-%d')}; full log: {log}\n")
    print('| check | result | figures |\n| --- | --- | --- |')
    for name, ok, figures in results:
        print(f"| {name} | {'ok' if ok else 'FAILED'} | {figures} |")
    sys.exit(0 if all(ok for _, ok, _ in results) else 1)


if __name__ == '__main__':
    cli(main, GpuCheckConfig)
