"""
Throughput of serve.py with 1, 4 and 16 concurrent streaming clients, against the same 16 requests
served one after another, and the latency to the first token. Starts serve.py on a free port, runs
the clients (threads streaming /v1/completions with httpx), prints one Markdown table, stops it.

    python scripts/bench_serve.py --out_dir=out-shakespeare-char
    python scripts/bench_serve.py --out_dir=out-bench --max_tokens=128 --clients=1,4,16
    python scripts/bench_serve.py --out_dir=out-bench --compile=True  # the compiled decode step

tokens/s counts every client's streamed tokens (one chunk each) over the wall time from the first
request to the last token. The same sampling settings and seeds are used in every row.
"""

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import cli  # noqa: E402

PROMPTS = ['ROMEO:', 'JULIET:', 'First Citizen:', 'KING HENRY:', 'MENENIUS:', 'HAMLET:', 'O, ',
           'What ', 'LADY ', 'Thou ', 'My lord', 'And ', 'Now ', 'BRUTUS:', 'Nurse:', 'The ']


@dataclass
class BenchServeConfig:
    out_dir: str = 'out-shakespeare-char'
    ckpt: str = 'best.pt'
    clients: str = '1,4,16'  # concurrent streaming clients per run, comma-separated
    max_tokens: int = 128  # tokens each request generates (no stop: every request runs to it)
    device: str = 'cpu'
    dtype: str = 'float32'
    compile: bool | str = 'auto'  # serve.py's: the compiled decode step (compiled before timing)


def stream(client, url, body, out):
    """One streaming request: out gets (seconds to first token, tokens, end time)."""
    t0 = time.perf_counter()
    first, n = None, 0
    with client.stream('POST', url + '/v1/completions', json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith('data: {'):
                n += 1
                first = first or time.perf_counter() - t0
    out.append((first, n, time.perf_counter()))


def run(client, url, bodies, concurrent):
    """All bodies, `concurrent` at a time (1: one after another); (tokens/s, TTFTs)."""
    results, t0 = [], time.perf_counter()
    for start in range(0, len(bodies), concurrent):
        threads = [threading.Thread(target=stream, args=(client, url, b, results))
                   for b in bodies[start:start + concurrent]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    tokens = sum(n for _, n, _ in results)
    return tokens / (max(end for *_, end in results) - t0), [f for f, _, _ in results]


def main(cfg):
    import httpx
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}'
    server = subprocess.Popen([sys.executable, 'serve.py', f'--out_dir={cfg.out_dir}',
                               f'--ckpt={cfg.ckpt}', f'--port={port}', f'--device={cfg.device}',
                               f'--dtype={cfg.dtype}', f'--compile={cfg.compile}',
                               '--model_name=bench'], cwd=REPO)
    # one client for every thread, made before the clock starts: a new httpx.Client per request
    # builds an SSL context (~20 ms of Python each), which for 16 threads sharing the GIL was most
    # of the first-token latency this script measured before 2026-12-07 (docs/serving.md)
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=None))
    try:
        while True:
            try:
                if client.get(url + '/health').status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            if server.poll() is not None:
                raise SystemExit("serve.py exited")
        bodies = [dict(model='bench', prompt=p, max_tokens=cfg.max_tokens, temperature=0.8,
                       seed=i, stream=True) for i, p in enumerate(PROMPTS)]
        run(client, url, bodies[:2], 1)  # warm-up
        print("| clients | requests | tokens/s | x one client | first token mean (s) "
              "| first token max (s) |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        base = None
        for c in [int(x) for x in cfg.clients.split(',')]:
            for label, concurrent, reqs in ((f'{c} at once', c, bodies[:c]),
                                            (f'{c} one after another', 1, bodies[:c])):
                if c == 1 and concurrent == 1 and label.endswith('another'):
                    continue
                tps, ttft = run(client, url, reqs, concurrent)
                base = base or tps
                print(f"| {label} | {len(reqs)} | {tps:,.0f} | {tps / base:.1f} | "
                      f"{sum(ttft) / len(ttft):.3f} | {max(ttft):.3f} |", flush=True)
    finally:
        client.close()
        server.terminate()
        server.wait(10)


if __name__ == '__main__':
    cli(main, BenchServeConfig)
