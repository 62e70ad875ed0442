"""Every command a user types, on every kind of model the README makes, with the default flags.

Models: each kind at the README's real shape (its config file), trained a few steps; built once per
session. Consumers: sample.py (one sample streamed, several batched), chat.py (chat models), the
serving engine, eval.py, the Hugging Face export, plot.py; serve.py itself as a user starts it, with
OpenAI's client, in the slow part. Precision: dtype 'auto' as it resolves on an AMD Zen 3 (AVX2,
no bf16 units) and on a Zen 4 or Intel CPU with AVX-512 BF16 / AMX (the capability check mocked
both ways, so both are covered whatever CPU runs the tests), and every value forced: float32,
bfloat16, float16 (refused off CUDA in one line).
"""

import dataclasses
import os
import sys

import pytest
import torch

import chat
import eval as evaluate
import sample
import train
from configurator import load_config
from conftest import SHARED, flags, run_script, serving
from nanogpt import device
from nanogpt.checkpoint import load_model
from nanogpt.engine import Engine, Row
from nanogpt.errors import UserError
from test_chat import prepare_chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ['--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--log_interval=1']


def train_run(out_dir, config, *args):
    """train.py as typed (a config file of the README, then flags), shortened to a few steps."""
    cfg = load_config(train.TrainConfig, [os.path.join(REPO, 'config', config), *SHORT,
                                          f'--out_dir={out_dir}', *args])
    train.main(cfg)
    return cfg


@dataclasses.dataclass
class Kind:
    name: str
    out_dir: str = 'out'  # the run's folder ('resume') ...
    init_from: str = 'resume'  # ... or a Hugging Face folder
    data_dir: str = ''  # its dataset, for eval.py
    chat: bool = False
    gpt2_arch: bool = True  # exports to a Hugging Face GPT-2 folder


@pytest.fixture(scope='session')
def kinds(tmp_path_factory, char_data, shakespeare_text):
    """name -> a function building that kind of model (once), returning its Kind."""
    root, built = tmp_path_factory.mktemp('matrix'), {}

    def quickstart():
        train_run(root / 'quickstart', 'train_shakespeare_char_cpu.py', f'--data_dir={char_data}')
        return Kind('quickstart', str(root / 'quickstart'), data_dir=str(char_data))

    def baby():  # 6x384, context 256: a smaller batch is the only change
        train_run(root / 'baby', 'train_shakespeare_char.py', f'--data_dir={char_data}',
                  '--batch_size=2')
        return Kind('baby', str(root / 'baby'), data_dir=str(char_data))

    def gpt2_bpe():  # GPT-2's BPE, the vocabulary padded to 50304 rows
        data = build('bpe_data')
        train_run(root / 'gpt2_bpe', 'train_gpt2.py', f'--data_dir={data}', '--dataset=shakespeare',
                  '--n_layer=2', '--n_head=2', '--n_embd=64', '--block_size=64', '--batch_size=2',
                  '--gradient_accumulation_steps=1', '--device=cpu')
        return Kind('gpt2_bpe', str(root / 'gpt2_bpe'), data_dir=str(data))

    def chat_sft():
        base = build('quickstart').out_dir
        data = prepare_chat(root / 'chat_data', base)
        train_run(root / 'chat', 'sft_chat_cpu.py', f'--init_from={base}', f'--data_dir={data}')
        return Kind('chat', str(root / 'chat'), data_dir=str(data), chat=True)

    def lora():
        base = build('quickstart').out_dir
        train_run(root / 'lora', 'train_shakespeare_char_cpu.py', f'--init_from={base}',
                  f'--data_dir={char_data}', '--lora_rank=4')
        return Kind('lora', str(root / 'lora'), data_dir=str(char_data))

    def fsdp():
        cfg = load_config(train.TrainConfig, [
            os.path.join(REPO, 'config', 'train_shakespeare_char_cpu.py'), *SHORT,
            f'--out_dir={root / "fsdp"}', f'--data_dir={char_data}', '--parallelism=fsdp',
            '--gradient_accumulation_steps=2'])
        r = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                       'train.py', *flags(cfg), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return Kind('fsdp', str(root / 'fsdp'), data_dir=str(char_data))

    def hf():  # a GPT-2 stand-in in a Hugging Face folder, as OpenAI's would be
        transformers = pytest.importorskip('transformers')
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(config).save_pretrained(root / 'hf')
        return Kind('hf', init_from=str(root / 'hf'), data_dir=str(build('bpe_data')))

    def modern():
        train_run(root / 'modern', 'speedrun_shakespeare_char_cpu.py', f'--data_dir={char_data}')
        return Kind('modern', str(root / 'modern'), data_dir=str(char_data), gpt2_arch=False)

    def bpe_data():
        tiktoken_cache = os.path.join(SHARED, 'tiktoken')
        if not (os.environ.get('TIKTOKEN_CACHE_DIR') or os.path.isdir(tiktoken_cache)):
            pytest.skip("GPT-2's BPE offline needs TIKTOKEN_CACHE_DIR")
        os.environ.setdefault('TIKTOKEN_CACHE_DIR', tiktoken_cache)
        (root / 'input.txt').write_text(shakespeare_text)
        r = run_script('data/shakespeare/prepare.py', '--input', str(root / 'input.txt'),
                       '--out_dir', str(root / 'bpe'))
        assert r.returncode == 0, r.stderr
        return root / 'bpe'

    makers = dict(quickstart=quickstart, baby=baby, gpt2_bpe=gpt2_bpe, chat=chat_sft, lora=lora,
                  fsdp=fsdp, hf=hf, modern=modern, bpe_data=bpe_data)

    def build(name):
        if name not in built:
            built[name] = makers[name]()
        return built[name]
    return build


KINDS = ['quickstart', 'baby', 'gpt2_bpe', 'chat', 'lora',
         pytest.param('fsdp', marks=pytest.mark.slow), 'hf', 'modern']

# the CPUs dtype='auto' meets: (native bf16 units, PyTorch's kernel level)
CPUS = {'zen3': (False, 'AVX2'), 'zen4': (True, 'AVX512')}
# dtype as a user passes it; auto-zen3 / auto-zen4: 'auto' on that CPU
DTYPES = ['auto-zen3', 'auto-zen4', 'float32', 'bfloat16', 'float16']


@pytest.fixture
def dtype(request, monkeypatch):
    """The --dtype flag of a cell, with the CPU's bf16 capability mocked for the 'auto' ones."""
    name = request.param
    if name.startswith('auto-'):
        native, level = CPUS[name[5:]]
        monkeypatch.setattr(device, 'cpu_has_native_bf16', lambda cpuinfo=None: native)
        monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: level)
        return 'auto'
    return name


def where(kind):
    return dict(init_from=kind.init_from, out_dir=kind.out_dir)


def refused(fn, capsys):
    """fn() must stop with one line (a UserError), as cli would print it."""
    with pytest.raises(UserError) as e:
        fn()
    assert '\n' not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize('dtype', DTYPES, indirect=True)
@pytest.mark.parametrize('kind', KINDS)
def test_sample_streams_one_sample(kinds, kind, dtype, capsys):
    kind = kinds(kind)
    cfg = sample.SampleConfig(**where(kind), num_samples=1, max_new_tokens=8, dtype=dtype)
    if dtype == 'float16':
        assert 'float16 needs CUDA' in refused(lambda: sample.main(cfg), capsys)
        return
    [text] = sample.main(cfg)
    out = capsys.readouterr().out
    assert len(text) > 1 and text in out  # streamed to the terminal, then the speed line
    assert 'tokens/s on cpu' in out


@pytest.mark.parametrize('dtype', ['auto-zen3', 'auto-zen4'], indirect=True)
@pytest.mark.parametrize('kind', KINDS)
def test_sample_batches_several_samples(kinds, kind, dtype, capsys):
    kind = kinds(kind)
    texts = sample.main(sample.SampleConfig(**where(kind), num_samples=3, max_new_tokens=8,
                                            dtype=dtype))
    assert len(texts) == 3 and all(len(t) > 1 for t in texts)


@pytest.mark.parametrize('dtype', DTYPES, indirect=True)
def test_chat_replies_in_the_terminal(kinds, dtype, monkeypatch, capsys):
    kind = kinds('chat')
    lines = iter(['What is the secret word for red?'])

    def typed(prompt=''):  # one message, then Ctrl-D
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line
    monkeypatch.setattr('builtins.input', typed)
    cfg = chat.ChatConfig(out_dir=kind.out_dir, max_new_tokens=8, dtype=dtype)
    if dtype == 'float16':
        assert 'float16 needs CUDA' in refused(lambda: chat.main(cfg), capsys)
        return
    messages = chat.main(cfg)
    assert [m['role'] for m in messages] == ['user', 'assistant']


@pytest.mark.parametrize('dtype', DTYPES, indirect=True)
@pytest.mark.parametrize('kind', KINDS)
def test_the_serving_engine_decodes_rows_together(kinds, kind, dtype):
    """serve.py's precision (device.setup for max_rows rows) and its engine, without HTTP: rows of
    different lengths, one with a stop token, each ends with tokens and no error."""
    kind = kinds(kind)
    if dtype == 'float16':
        with pytest.raises(UserError, match='float16 needs CUDA'):
            device.setup('cpu', dtype, sample_rows=32)
        return
    dev = device.setup('auto', dtype, sample_rows=32)
    model, tokenizer, _ = load_model(kind.init_from, kind.out_dir)
    engine = Engine(model.to(dev.device), tokenizer, 32, dev.autocast)
    events = [[] for _ in range(3)]
    rows = [Row(tokenizer.encode(p), 6, events[i].append, temperature=t, seed=i)
            for i, (p, t) in enumerate([('A', 0.0), ('ROMEO:\n', 0.8), ('The', 1.0)])]
    engine.submit(rows)
    while engine.active or not engine.waiting.empty():
        with torch.no_grad(), engine.autocast:
            engine.step()
    for ev in events:
        assert not any('error' in e for e in ev), ev
        assert ev[-1]['finish_reason'] in ('length', 'stop') and len(ev) <= 6


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16'])
@pytest.mark.parametrize('kind', KINDS)
def test_eval_scores_a_split(kinds, kind, dtype, tmp_path, capsys):
    kind = kinds(kind)
    cfg = evaluate.EvalConfig(init_from=kind.init_from,
                              out_dir=kind.out_dir if kind.init_from == 'resume' else str(tmp_path),
                              data_dir=kind.data_dir, max_tokens=300, bleu_samples=0,
                              dtype=dtype)
    if dtype == 'float16':
        assert 'float16 needs CUDA' in refused(lambda: evaluate.main(cfg), capsys)
        return
    result = evaluate.main(cfg)
    assert 0 < result['loss'] < 20 and result['tokens'] > 0


@pytest.mark.parametrize('kind', KINDS)
def test_the_hugging_face_export_gives_our_logits(kinds, kind, tmp_path, capsys):
    from scripts import export_hf
    kind = kinds(kind)
    if kind.init_from != 'resume':
        pytest.skip('already a Hugging Face folder')
    transformers = pytest.importorskip('transformers')
    cfg = export_hf.ExportConfig(out_dir=kind.out_dir, hf_dir=str(tmp_path / 'hf'))
    if not kind.gpt2_arch:
        assert "only GPT-2's architecture" in refused(lambda: export_hf.main(cfg), capsys)
        return
    export_hf.main(cfg)
    ours, tokenizer, _ = load_model('resume', kind.out_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    ids = torch.tensor([tokenizer.encode('ROMEO:\nWhat')])
    with torch.no_grad():
        a, b = ours(ids, targets=ids)[0], theirs(ids).logits
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize('kind', [k for k in KINDS if k != 'hf'])
def test_plot_draws_the_run(kinds, kind, tmp_path):
    pytest.importorskip('matplotlib')
    from scripts import plot
    kind = kinds(kind)
    plot.main(plot.PlotConfig(out_dir=kind.out_dir, output=str(tmp_path / 'loss.png')))
    assert (tmp_path / 'loss.png').stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize('flags_', [(), ('--dtype=bfloat16',), ('--dtype=float32',)],
                         ids=['defaults', 'bf16', 'fp32'])
@pytest.mark.parametrize('kind', KINDS)
def test_serve_answers_openai_clients(kinds, kind, flags_):
    """python serve.py --out_dir=... as the README has it (the defaults, then bf16 and fp32
    forced), talked to with OpenAI's client: completions and chat, streamed and not."""
    openai = pytest.importorskip('openai')
    kind = kinds(kind)
    args = ([] if kind.init_from == 'resume' else [f'--init_from={kind.init_from}'])
    with serving(kind.out_dir, *args, *flags_) as url:
        client = openai.OpenAI(base_url=url + '/v1', api_key='none', max_retries=0)
        model = client.models.list().data[0].id
        done = client.completions.create(model=model, prompt='ROMEO:', max_tokens=5)
        assert done.choices[0].finish_reason in ('length', 'stop') and done.usage.total_tokens
        pieces = list(client.completions.create(model=model, prompt='ROMEO:', max_tokens=5,
                                                stream=True))
        assert pieces and pieces[-1].choices[0].finish_reason in ('length', 'stop')
        ask = dict(model=model, max_tokens=5, messages=[{'role': 'user', 'content': 'Hello'}])
        reply = client.chat.completions.create(**ask)
        assert reply.choices[0].message.role == 'assistant'
        chunks = list(client.chat.completions.create(**ask, stream=True))
        assert chunks[-1].choices[0].finish_reason in ('length', 'stop')


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
