import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # tests import model, train, ... as the scripts do
# ../shared/data beside the checkout (CI has it); NANOGPT_SHARED_DATA points elsewhere
SHARED = os.environ.get('NANOGPT_SHARED_DATA', os.path.join(REPO, '..', 'shared', 'data'))
SHAKESPEARE = os.path.join(SHARED, 'tinyshakespeare', 'input.txt')
TIKTOKEN_CACHE = os.path.join(SHARED, 'tiktoken')  # tiktoken's cached r50k_base file: GPT-2's BPE offline


def run_script(*args, env=None, timeout=300):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope='session')
def shakespeare_text():
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"tiny Shakespeare not found at {SHAKESPEARE} (set NANOGPT_SHARED_DATA)")
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
    """GPT-2's BPE from the shared offline tiktoken cache; TIKTOKEN_CACHE_DIR stays set for the session,
    so the scripts the tests run find it too."""
    if not os.path.isdir(TIKTOKEN_CACHE):
        pytest.skip(f"no tiktoken cache at {TIKTOKEN_CACHE} (set NANOGPT_SHARED_DATA)")
    from tokenizer import GPT2_VOCAB, Tokenizer
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)
        yield Tokenizer(GPT2_VOCAB)


@pytest.fixture(scope='session')
def bpe_data(tmp_path_factory, shakespeare_text, gpt2_bpe):
    """data/shakespeare (GPT-2 BPE) prepared from the real corpus into a temporary folder."""
    return prepare_shakespeare('shakespeare', tmp_path_factory.mktemp('shakespeare'))


def tiny_train_config(out_dir, data_dir, **overrides):
    """A TrainConfig for a model small enough to train in seconds on a CPU."""
    from train import TrainConfig
    base = dict(out_dir=str(out_dir), dataset='shakespeare_char', data_dir=str(data_dir), device='cpu',
                compile=False, n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8,
                gradient_accumulation_steps=1, dropout=0.0, learning_rate=3e-3, max_iters=20,
                lr_decay_iters=20, warmup_iters=5, min_lr=3e-4, eval_interval=10, eval_iters=5,
                log_interval=10, beta2=0.99)
    base.update(overrides)
    return TrainConfig(**base)


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
