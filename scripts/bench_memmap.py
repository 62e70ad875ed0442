"""
Resident memory and time of drawing training batches from a large train.bin: one memmap kept open
for the whole run, against a memmap opened per batch (as nanoGPT does). A long-lived map keeps every
page it has touched mapped into the process, so its resident set grows with the file's pages read.

    python scripts/bench_memmap.py --size_gb=4 --batches=20000     # writes a 4 GB file in /tmp

Each way runs in a fresh process, after the file's pages were dropped from this process; the
figures go into docs/speed.md.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import cli


def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


def draw(path, batches, reopen, batch_size=12, block_size=1024):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nanogpt.dataset import get_batch
    data = np.memmap(path, dtype=np.uint16, mode='r')
    start = rss_mb()
    t0 = time.perf_counter()
    for i in range(batches):
        if reopen:
            data = np.memmap(path, dtype=np.uint16, mode='r')
        get_batch(data, block_size, batch_size, seed=i)
    dt = time.perf_counter() - t0
    print(f"{'opened per batch' if reopen else 'kept open'}: {batches} batches of {batch_size} x "
          f"{block_size + 1} tokens, {1e6 * dt / batches:.0f} us per batch, resident memory "
          f"{start:.0f} -> {rss_mb():.0f} MB")


@dataclass
class BenchMemmapConfig:
    size_gb: float = 4.0  # of random token ids written to path (once)
    batches: int = 20000
    path: str = '/tmp/bench_memmap.bin'
    child: str = ''  # 'open' or 'reopen': one of the two ways, in a child process


def main(cfg):
    if cfg.child:
        return draw(cfg.path, cfg.batches, cfg.child == 'reopen')
    n = int(cfg.size_gb * 2**30) // 2
    if not os.path.isfile(cfg.path) or os.path.getsize(cfg.path) != 2 * n:
        print(f"writing {cfg.path} ({cfg.size_gb} GB of random token ids)")
        rng = np.random.default_rng(0)
        with open(cfg.path, 'wb') as f:
            for i in range(0, n, 2**26):
                rng.integers(0, 50257, min(2**26, n - i), dtype=np.uint16).tofile(f)
    for child in ('open', 'reopen'):
        subprocess.run([sys.executable, __file__, f'--child={child}', f'--path={cfg.path}',
                        f'--batches={cfg.batches}'], check=True)


if __name__ == '__main__':
    cli(main, BenchMemmapConfig)
