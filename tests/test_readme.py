"""Every command in a README code block is run here as written, in README order, in a copy of the
repo (with flags appended that shorten a long run), or is listed below with the reason it cannot
run here. A command added to the README without either fails the first test."""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, SHAKESPEARE, free_port

# flags appended to make a long run short; later flags win, so they override the command's
TRAIN = ' --max_iters=4 --eval_interval=2 --eval_iters=1 --log_interval=1'
SAMPLE = ' --num_samples=2 --max_new_tokens=20'
NETWORK = "downloads (the network); the tests prepare the same data from local files"
WEIGHTS = "needs OpenAI's GPT-2 weights (the network); tests/test_gpt2.py uses a local stand-in"
GPUS = 'needs 8 GPUs and OpenWebText / FineWeb-Edu'
INSTALL = 'installs packages; .ci/run and scripts/test.sh do it'
SUITE = 'runs this very test suite'

# command as written -> ('run', flags appended) | ('serve', flags) | ('skip', why)
COMMANDS = {
    'pip install torch': ('skip', INSTALL),
    'pip install -r requirements.txt': ('skip', INSTALL),
    'pip install -e .[serve]': ('skip', INSTALL),
    'pip install -e .[data]': ('skip', INSTALL),
    'bash scripts/quickstart.sh --input input.txt': ('run', ''),  # its own copy: see below
    'bash scripts/test.sh': ('skip', SUITE),
    'python -m pytest -q tests': ('skip', SUITE),
    'python -m pytest -q -m "not slow" tests': ('skip', SUITE),
    'python data/shakespeare_char/prepare.py': ('run', ''),
    'python train.py config/train_shakespeare_char_cpu.py': ('run', TRAIN),
    'python sample.py --out_dir=out-shakespeare-char-cpu': ('run', SAMPLE),
    'python train.py config/train_shakespeare_char.py': ('run', TRAIN + ' --batch_size=2'),
    'python sample.py --out_dir=out-shakespeare-char': ('run', SAMPLE),
    'python train.py [config file] [--key=value ...]': ('skip', 'the general form, not a command'),
    'torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py': ('skip', GPUS),
    'torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_cpu.py '
    '--gradient_accumulation_steps=2 --out_dir=out-ddp': ('run', TRAIN),
    'python train.py config/finetune_shakespeare_lora.py': ('skip', WEIGHTS),
    'torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --parallelism=fsdp':
        ('skip', GPUS),
    'python bench.py config/finetune_shakespeare_lora.py --init_from=scratch --n_layer=48 '
    '--n_head=25 --n_embd=1600 --memory=True --bench_iters=0': ('run', ''),
    'python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=1 '
    '--max_new_tokens=500': ('run', ' --max_new_tokens=20'),
    'python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3 '
    '--max_new_tokens=200': ('run', ' --max_new_tokens=20'),
    'python sample.py --out_dir=out-shakespeare-char-cpu --start=FILE:prompt.txt '
    '--temperature=0.5 --top_p=0.9 --stop="\'\\n\\n\'"': ('run', ' --max_new_tokens=20'),
    'python serve.py --out_dir=out-shakespeare-char': ('serve', ''),
    'python data/chat/prepare.py': ('skip', NETWORK),
    'python train.py config/sft_gpt2.py': ('skip', WEIGHTS),
    'python chat.py --out_dir=out-sft-gpt2': ('skip', 'needs the run above (OpenAI\'s GPT-2)'),
    'python eval.py --out_dir=out-shakespeare-char-cpu': ('run', ' --max_tokens=2000 '
                                                          '--bleu_samples=2'),
    'python eval.py --init_from=gpt2 --dataset=openwebtext --out_dir=out-eval-gpt2':
        ('skip', WEIGHTS),
    'python data/hellaswag/prepare.py': ('skip', NETWORK),
    'python eval.py --init_from=gpt2 --out_dir=out-eval-gpt2 --task=hellaswag': ('skip', WEIGHTS),
    'python eval.py --out_dir=out-shakespeare --mc_file=my_set.jsonl':
        ('skip', "needs out-shakespeare, a finetune of OpenAI's GPT-2"),
    'python data/shakespeare/prepare.py': ('run', ''),
    'python data/fineweb_edu/prepare.py && python data/hellaswag/prepare.py': ('skip', NETWORK),
    'torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py':
        ('skip', GPUS),
    'python data/openwebtext/prepare.py': ('skip', NETWORK),
    'python train.py config/eval_gpt2.py': ('skip', WEIGHTS),
    'python sample.py --init_from=gpt2-xl --start="What is the answer to life, the universe, '
    'and everything?"': ('skip', WEIGHTS),
    'python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare.py':
        ('skip', WEIGHTS),
    'python sample.py --out_dir=out-shakespeare --start="ROMEO:"':
        ('skip', "needs out-shakespeare, a finetune of OpenAI's GPT-2"),
    'python scripts/export_hf.py --out_dir=out-shakespeare --hf_dir=hf-shakespeare':
        ('skip', "needs out-shakespeare, a finetune of OpenAI's GPT-2"),
    'python data/text/prepare.py --input my_novel.txt': ('run', ''),
    'python data/text/prepare.py --input letters/ --tokenizer gpt2': ('run', ''),
    'python data/text/prepare.py --input my_novel.txt --tokenizer bpe --vocab_size 2048':
        ('run', ''),
    'python train.py config/train_shakespeare_char_cpu.py --dataset=my_novel '
    '--out_dir=out-my-novel': ('run', TRAIN),
    'python sample.py --out_dir=out-my-novel': ('run', SAMPLE),
    'python scripts/plot.py --out_dir=out-shakespeare-char-cpu --output=loss.png': ('run', ''),
    'python scripts/plot.py --out_dir=out-a,out-b --output=compare.png --title="lr 1e-3 vs 3e-3"':
        ('run', ''),
}


def readme_commands():
    """The commands of the README's ```sh blocks, in order: continuation lines joined, comments
    and blank lines dropped, spaces collapsed."""
    with open(os.path.join(REPO, 'README.md')) as f:
        blocks = re.findall(r'```sh\n(.*?)```', f.read(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace('\\\n', ' ').split('\n'):
            line = re.sub(r'\s+#.*$', '', line).strip()
            if line and not line.startswith('#'):
                commands.append(re.sub(r'\s+', ' ', line))
    return commands


def test_every_readme_command_is_run_or_says_why_not():
    unknown = [c for c in readme_commands() if c not in COMMANDS]
    assert not unknown, f"README commands the test neither runs nor skips: {unknown}"


def sandbox(path):
    """A copy of the repo's tracked files, with tiny Shakespeare where the prepare scripts would
    download it, and the files the README's commands name (prompt.txt, my_novel.txt, letters/)."""
    files = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split('\n')
    for name in filter(None, files):
        if os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(os.path.join(path, os.path.dirname(name)), exist_ok=True)
            shutil.copy(os.path.join(REPO, name), os.path.join(path, name))
    text = open(SHAKESPEARE, encoding='utf-8').read()
    for where in ('data/shakespeare_char', 'data/shakespeare', '.'):
        shutil.copy(SHAKESPEARE, os.path.join(path, where, 'input.txt'))
    (path / 'prompt.txt').write_text('ROMEO:\n')
    (path / 'my_novel.txt').write_text(text[:200_000])
    os.makedirs(path / 'letters')
    (path / 'letters' / 'a.txt').write_text(text[:50_000])
    (path / 'letters' / 'b.txt').write_text(text[50_000:100_000])
    return path


def shell(command, cwd, env, timeout=600):
    return subprocess.run(['bash', '-c', command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope='module')
def env():
    pytest.importorskip('fastapi')
    return {**os.environ, 'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
            'OMP_NUM_THREADS': '1'}


@pytest.mark.slow
def test_the_readme_commands_run_as_written_in_order(tmp_path, env):
    if SHAKESPEARE is None:
        pytest.skip('no tiny Shakespeare (NANOGPT_SHARED_DATA)')
    box = sandbox(tmp_path / 'repo')
    for command in readme_commands():
        action, extra = COMMANDS[command]
        if action == 'skip' or command.startswith('bash scripts/quickstart.sh'):
            continue
        if command.startswith('python scripts/plot.py --out_dir=out-a,out-b'):
            for name in ('out-a', 'out-b'):  # two runs to compare
                shutil.copytree(box / 'out-shakespeare-char-cpu', box / name)
        if action == 'serve':
            serve(command + extra, box, env)
            continue
        r = shell(command + extra, box, env)
        assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert (box / 'loss.png').stat().st_size > 10_000 and (box / 'compare.png').is_file()
    assert {'train.bin', 'val.bin', 'meta.json'} <= set(os.listdir(box / 'data' / 'my_novel'))


def serve(command, box, env):
    """Start the server as written (on a free port), ask it for a completion, stop it."""
    port = free_port()
    proc = subprocess.Popen(['bash', '-c', f'exec {command} --port={port}'], cwd=box, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f'http://127.0.0.1:{port}'
        for _ in range(600):
            assert proc.poll() is None, proc.stdout.read()
            try:
                urllib.request.urlopen(url + '/health', timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        request = urllib.request.Request(
            url + '/v1/completions', headers={'Content-Type': 'application/json'},
            data=b'{"model": "out-shakespeare-char", "prompt": "ROMEO:", "max_tokens": 5}')
        body = urllib.request.urlopen(request, timeout=60).read().decode()
        assert '"finish_reason":"length"' in body.replace(' ', ''), body
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_quickstart_script_installs_prepares_trains_and_samples(tmp_path, env):
    if SHAKESPEARE is None:
        pytest.skip('no tiny Shakespeare (NANOGPT_SHARED_DATA)')
    box = sandbox(tmp_path / 'repo')
    env = {**env, 'TRAIN_FLAGS': TRAIN, 'SAMPLE_FLAGS': SAMPLE, 'PIP_NO_INDEX': '1'}
    r = shell('bash scripts/quickstart.sh --input input.txt', box, env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'step 4: train loss' in r.stdout and r.stdout.count('---------------') == 2
