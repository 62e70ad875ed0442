"""What the tests share: where the real data is, the tiny models and configs, and helpers that run
scripts, write command lines and compare checkpoints."""

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from nanogpt.run_dir import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one CPU thread per test process (and the scripts it runs), set before torch is imported: the tiny
# models here gain nothing from more, and on a busy small machine PyTorch's threads wait for each
# other (5x slower on 2 shared cores). A user's OMP_NUM_THREADS is kept.
os.environ.setdefault('OMP_NUM_THREADS', '1')
# ../shared/data beside the checkout (CI has it); NANOGPT_SHARED_DATA points elsewhere
SHARED = os.environ.get('NANOGPT_SHARED_DATA', os.path.join(REPO, '..', 'shared', 'data'))
# tiny Shakespeare: the shared copy, else the one `python data/shakespeare_char/prepare.py`
# downloads (the quick start runs it)
SHAKESPEARE_PATHS = (os.path.join(SHARED, 'tinyshakespeare', 'input.txt'),
                     os.path.join(REPO, 'data', 'shakespeare_char', 'input.txt'))
SHAKESPEARE = next((p for p in SHAKESPEARE_PATHS if os.path.isfile(p)), None)
# tiktoken's cache of GPT-2's BPE (r50k_base): the user's TIKTOKEN_CACHE_DIR, else the shared copy
# (offline), else None: tiktoken's own default cache, which it fills from the network
SHARED_TIKTOKEN = os.path.join(SHARED, 'tiktoken')
TIKTOKEN_CACHE = (os.environ.get('TIKTOKEN_CACHE_DIR')
                  or (SHARED_TIKTOKEN if os.path.isdir(SHARED_TIKTOKEN) else None))


def run_script(*args, env=None, timeout=300):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(out_dir, *args):
    """serve.py for the run in out_dir on a free port of 127.0.0.1, started as a user would; yields
    its URL once /health answers, and stops it on the way out."""
    pytest.importorskip('fastapi', reason='pip install -e .[serve]')
    httpx = pytest.importorskip('httpx')
    port = free_port()
    proc = subprocess.Popen([sys.executable, 'serve.py', f'--out_dir={out_dir}', f'--port={port}',
                             *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"serve.py exited: {proc.stdout.read()}")
            try:
                if httpx.get(url + '/health').status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def chromium():
    """A headless Chromium driven by selenium (skips without them); quit on the way out."""
    webdriver = pytest.importorskip('selenium.webdriver', reason='pip install selenium')
    if not (shutil.which('chromium') or shutil.which('chromium-browser')) or not shutil.which(
            'chromedriver'):
        pytest.skip("no Chromium/chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage'):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which('chromedriver'))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def flags(cfg):
    """The command line that gives cfg, a config dataclass or a dict of some of its keys."""
    items = dataclasses.asdict(cfg).items() if dataclasses.is_dataclass(cfg) else cfg.items()
    return [f'--{k}={v!r}' for k, v in items]


@pytest.fixture(scope='session')
def shakespeare_text():
    if SHAKESPEARE is None:
        pytest.skip(f"tiny Shakespeare not found at {' nor at '.join(SHAKESPEARE_PATHS)}: run "
                    "`python data/shakespeare_char/prepare.py` (it downloads it)")
    with open(SHAKESPEARE, encoding='utf-8') as f:
        return f.read()


def prepare_shakespeare(dataset, out):
    """Run data/<dataset>/prepare.py on a copy of the real corpus in the folder `out`."""
    src = out / 'input.txt'
    shutil.copy(SHAKESPEARE, src)  # the shared folder is read-only: work on a copy
    r = run_script(f'data/{dataset}/prepare.py', '--input', str(src), '--out_dir', str(out))
    assert r.returncode == 0, r.stderr
    return str(out)


@pytest.fixture(scope='session')
def char_data(tmp_path_factory, shakespeare_text):
    """data/shakespeare_char prepared from the real corpus into a temporary folder."""
    return prepare_shakespeare('shakespeare_char', tmp_path_factory.mktemp('shakespeare_char'))


@pytest.fixture(scope='session')
def gpt2_bpe():
    """GPT-2's BPE, from TIKTOKEN_CACHE; TIKTOKEN_CACHE_DIR stays set for the session, so the
    scripts the tests run find it too."""
    from nanogpt.errors import UserError
    from nanogpt.tokenizer import GPT2_VOCAB, Tokenizer
    with pytest.MonkeyPatch.context() as mp:
        if TIKTOKEN_CACHE:
            mp.setenv('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)
        try:
            tokenizer = Tokenizer(GPT2_VOCAB)
        except UserError as e:
            pytest.skip(f"{e} (or set NANOGPT_SHARED_DATA to a folder with tiktoken/ in it)")
        yield tokenizer


@pytest.fixture(scope='session')
def bpe_data(tmp_path_factory, shakespeare_text, gpt2_bpe):
    """data/shakespeare (GPT-2 BPE) prepared from the real corpus into a temporary folder."""
    return prepare_shakespeare('shakespeare', tmp_path_factory.mktemp('shakespeare'))


def tiny_train_config(out_dir, data_dir, **overrides):
    """A TrainConfig for a model small enough to train in seconds on a CPU."""
    from train import TrainConfig
    base = dict(out_dir=str(out_dir), dataset='shakespeare_char', data_dir=str(data_dir),
                device='cpu', compile=False, n_layer=2, n_head=2, n_embd=32, block_size=32,
                batch_size=8, gradient_accumulation_steps=1, dropout=0.0, learning_rate=3e-3,
                max_iters=20, lr_decay_iters=20, warmup_iters=5, min_lr=3e-4, eval_interval=10,
                eval_iters=5, log_interval=10, beta2=0.99)
    base.update(overrides)
    return TrainConfig(**base)


def tiny_gpt(weight_scale=1.0, **overrides):
    """A seeded GPT small enough to run in milliseconds: 2 layers, 2 heads, 32 wide, 16 positions,
    65 tokens, biases, no dropout; overrides change any GPTConfig field. weight_scale multiplies
    every weight after GPT-2's init (3: logits up to ~4, peakier than the near-uniform ones at
    init)."""
    import torch

    from model import GPT, GPTConfig
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                bias=True)
    model = GPT(GPTConfig(**{**args, **overrides}))
    if weight_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(weight_scale)
    return model


def metrics(out_dir):
    """The rows of a run's metrics log, out_dir/metrics.jsonl."""
    return read_metrics(out_dir)


def dir_snapshot(path):
    """Every file under path with its bytes and modification time: equal snapshots mean nothing
    was written, replaced, added or removed."""
    snap = {}
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            with open(p, 'rb') as f:
                snap[os.path.relpath(p, path)] = (f.read(), os.stat(p).st_mtime_ns)
    return snap


def weights(out_dir, name='ckpt.pt'):
    """The model weights of a run's checkpoint."""
    from nanogpt.checkpoint import load_checkpoint
    return load_checkpoint(os.path.join(out_dir, name))['model']


def same_weights(a, b):
    """Two state dicts hold the same tensors, bit for bit."""
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_diff(a, b):
    """The largest absolute difference between two state dicts' tensors."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --------------------------------------------------------------------------------------------------
# a trained run to fail on

@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp('run')
    import train
    train.main(tiny_train_config(out, char_data, max_iters=10, eval_interval=5))
    assert sorted(os.listdir(out)) == ['best.pt', 'ckpt.pt', 'ckpt_prev.pt', 'metrics.jsonl']
    return out


@pytest.fixture
def out_dir(trained_run, tmp_path):
    """A copy of the trained run's folder, for one test to fail on."""
    return shutil.copytree(trained_run, tmp_path / 'out')


def fails(script, config_cls, args, out_dir, capsys):
    """Run `python <script> args` in-process: it must exit with status 2 and one line on stderr, and
    change nothing in out_dir. Returns the line."""
    before = dir_snapshot(out_dir)
    with pytest.raises(SystemExit) as e:
        from configurator import cli
        cli(script.main, config_cls, [str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1, err
    assert dir_snapshot(out_dir) == before
    return err


def train_args(out_dir, data_dir, *extra):
    """A valid train.py command line for the trained run (resuming it to 20 steps), then extra
    flags."""
    cfg = tiny_train_config(out_dir, data_dir, max_iters=20, eval_interval=5, init_from='resume')
    return [*flags(cfg), *extra]
