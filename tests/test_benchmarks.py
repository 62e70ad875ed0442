"""Benchmarks: multiple-choice scoring against a per-ending brute force and on a hand-made set with
known answers, HellaSwag's conversion, exported tokenizers against ours, and lm-evaluation-harness
on an exported model agreeing with eval.py."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

import eval as eval_module
from conftest import run_script, tiny_gpt, tiny_train_config
from eval import EvalConfig
from eval import main as evaluate
from nanogpt.errors import UserError
from nanogpt.hf import export_hf, write_tokenizer
from nanogpt.multiple_choice import load_items, score
from nanogpt.tokenizer import Tokenizer, char_vocab
from train import main as train


def shakespeare_items(text, n, context_chars=60, ending_chars=30, n_endings=4):
    """n HellaSwag-format items from real text: a paragraph's start as the context, the starts of
    the next paragraphs as the endings, labels cycling 0, 1, 2, 3."""
    paragraphs = [p.replace('\n', ' ') for p in text.split('\n\n')]
    items = []
    for i in range(n):
        group = paragraphs[i * (n_endings + 1):(i + 1) * (n_endings + 1)]
        items.append({'context': group[0][:context_chars].strip(),
                      'endings': [p[:ending_chars].strip() for p in group[1:]],
                      'label': i % n_endings})
    return items


def write_jsonl(items, path):
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(item) + '\n' for item in items)
    return str(path)


@torch.no_grad()
def brute_force_ll(model, tokenizer, context, ending):
    """One ending alone: encode context + ' ' + ending, keep the last block_size + 1 tokens, one
    forward pass, and add up the log-softmax of each of the ending's tokens."""
    whole = tokenizer.encode(context + ' ' + ending)
    n_ending = len(whole) - len(tokenizer.encode(context))
    ids = torch.tensor(whole[-(model.config.block_size + 1):])
    logits, _ = model(ids[None, :-1], ids[None, 1:])  # (1, T, V): targets to get every position
    logp = F.log_softmax(logits[0].double(), dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n_ending, len(ids)))


@pytest.fixture(scope='module')
def char_tokenizer(shakespeare_text):
    return Tokenizer(char_vocab(shakespeare_text))


# BPE is slow here (a 50k-row head per ending): the character cases stay in the fast subset
@pytest.mark.parametrize('vocab, batch_size', [
    ('char', 1), ('char', 3), ('char', 64), *(pytest.param('bpe', b, marks=pytest.mark.slow)
                                             for b in (1, 3, 64))])
def test_batched_scorer_equals_a_brute_force_forward_pass_per_ending(
        vocab, batch_size, shakespeare_text, char_tokenizer, request):
    tokenizer = char_tokenizer if vocab == 'char' else request.getfixturevalue('gpt2_bpe')
    model = tiny_gpt(weight_scale=3, vocab_size=tokenizer.vocab_size, block_size=64).eval()
    # contexts long enough that some windows are cut from the left (64 tokens of context)
    items = shakespeare_items(shakespeare_text, 12, context_chars=200 if vocab == 'bpe' else 60)
    result = score(model, tokenizer, items, batch_size)
    assert result['scored'] == len(items) and result['skipped'] == 0
    correct, correct_norm = 0, 0
    for item, lls in zip(items, result['loglikelihoods']):
        brute = [brute_force_ll(model, tokenizer, item['context'], e) for e in item['endings']]
        assert lls == pytest.approx(brute, abs=1e-4)
        correct += max(range(4), key=lambda i: brute[i]) == item['label']
        correct_norm += max(range(4), key=lambda i: brute[i] / len(item['endings'][i])) \
            == item['label']
    assert result['acc'] == correct / len(items)
    assert result['acc_norm'] == correct_norm / len(items)


class OneNatPerToken(torch.nn.Module):
    """A stand-in model with known log-probabilities: every scored token costs exactly 1 nat, so an
    ending's ll is minus its token count (with a character vocabulary, -(1 + its characters): the
    space before it counts)."""

    def __init__(self, block_size=64):
        super().__init__()
        self.config = type('Config', (), {'block_size': block_size})()

    def forward(self, idx, targets, reduction='none'):
        return None, (targets != -1).float().view(-1)  # GPT's contract: 0 for ignored targets


def test_acc_and_acc_norm_on_a_hand_made_set_with_known_answers(char_tokenizer):
    # ll = -(1 + L): acc picks the shortest ending; ll / L = -1 - 1/L: acc_norm picks the longest
    items = [{'context': 'Once', 'endings': ['a', 'bbbb', 'cc'], 'label': 0},        # shortest
             {'context': 'Twice', 'endings': ['dddd', 'e', 'ffffff'], 'label': 1},   # shortest
             {'context': 'Thrice', 'endings': ['gg', 'hhh', 'i'], 'label': 2},       # shortest
             {'context': 'Never', 'endings': ['jjjjj', 'kk', 'lll'], 'label': 0}]    # longest
    result = score(OneNatPerToken(), char_tokenizer, items, batch_size=5)
    assert result['loglikelihoods'][0] == [-2, -5, -3]
    assert result['acc'] == 0.75 and result['acc_norm'] == 0.25
    # standard error of a mean of 0/1 outcomes: sqrt(p (1 - p) / (n - 1)) = sqrt(0.1875 / 3)
    assert result['acc_stderr'] == pytest.approx(0.25)
    # equal lls: the first ending wins, as numpy's argmax in lm-evaluation-harness
    tie = [{'context': 'Tie', 'endings': ['xy', 'zw'], 'label': 1}]
    assert score(OneNatPerToken(), char_tokenizer, tie)['acc'] == 0.0


def test_items_a_char_vocabulary_cannot_encode_are_skipped_and_counted(char_tokenizer):
    items = [{'context': 'ROMEO:', 'endings': ['I love', 'thee'], 'label': 0},
             {'context': 'Cost: 100%', 'endings': ['a', 'b'], 'label': 0},  # '%', '1', '0'
             {'context': 'Hello', 'endings': ['caf\u00e9', 'b'], 'label': 1}]  # 'é'
    result = score(OneNatPerToken(), char_tokenizer, items)
    assert (result['scored'], result['skipped']) == (1, 2)
    assert result['loglikelihoods'][1:] == [None, None]
    with pytest.raises(UserError, match='no item could be scored'):
        score(OneNatPerToken(), char_tokenizer, items[1:])


@pytest.mark.parametrize('line, message', [
    ('{"context": "a", "endings": ["b"], "label": 0}', 'two or more'),
    ('{"context": "a", "endings": ["b", "c"], "label": 2}', 'label'),
    ('{"context": "", "endings": ["b", "c"], "label": 0}', 'context'),
    ('not json', 'not JSON')])
def test_malformed_items_are_refused_with_their_line(tmp_path, line, message):
    path = tmp_path / 'bad.jsonl'
    path.write_text('{"context": "a", "endings": ["b", "c"], "label": 1}\n' + line + '\n')
    with pytest.raises(UserError, match=f'bad.jsonl:2: .*{message}'):
        load_items(path)


def test_hellaswag_prepare_converts_official_items_as_lm_evaluation_harness_does(tmp_path):
    official = {'ind': 24, 'activity_label': 'Roof shingle removal',
                'ctx_a': 'A man is sitting on a roof.', 'ctx_b': 'he',
                'ctx': 'A man is sitting on a roof. he', 'split': 'val', 'split_type': 'indomain',
                'source_id': 'activitynet~v_-JhWjGDPHMY', 'label': 3,
                'endings': ['is using wrap to wrap a pair of skis.', 'is ripping level tiles off.',
                            "is holding a rubik's cube.", 'starts pulling up roofing on a roof.']}
    wikihow = {**official, 'activity_label': 'Health', 'ctx_a': '[header] How to rest [title] Sit.',
               'ctx_b': '', 'label': '0', 'endings': ['[step] Breathe  in.', 'b', 'c', 'd']}
    src = write_jsonl([official, wikihow], tmp_path / 'hellaswag_val.jsonl')
    r = run_script('data/hellaswag/prepare.py', '--input', src, '--out', str(tmp_path / 'v.jsonl'))
    assert r.returncode == 0, r.stderr
    items = load_items(tmp_path / 'v.jsonl')
    assert items[0]['context'] == 'Roof shingle removal: A man is sitting on a roof. He'
    assert items[0]['endings'][3] == 'starts pulling up roofing on a roof.'
    assert items[0]['label'] == 3 and items[1]['label'] == 0
    assert items[1]['context'] == 'Health: How to rest. Sit.'
    # lm-evaluation-harness strips before it removes the markup: a leading space stays
    assert items[1]['endings'][0] == ' Breathe in.'


@pytest.fixture(scope='module')
def char_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp('run')
    train(tiny_train_config(out, char_data, max_iters=10))
    return str(out)


def test_eval_scores_a_multiple_choice_file_and_writes_json(char_run, shakespeare_text, tmp_path,
                                                           monkeypatch):
    items = shakespeare_items(shakespeare_text, 6, context_chars=20, ending_chars=8)
    items.append({'context': 'Price: 5%', 'endings': ['a', 'b'], 'label': 0})  # not encodable
    path = write_jsonl(items, tmp_path / 'mine.jsonl')
    cfg = EvalConfig(out_dir=char_run, mc_file=path, device='cpu', batch_size=5)
    result = evaluate(cfg)
    assert (result['items'], result['scored'], result['skipped']) == (7, 6, 1)
    with open(os.path.join(char_run, 'eval_best_mine.json')) as f:
        written = json.load(f)
    assert written['acc'] == result['acc'] and written['loglikelihoods'][:6] == \
        result['loglikelihoods'][:6]
    # HellaSwag not prepared yet: eval.py says how to
    monkeypatch.setitem(eval_module.TASKS, 'hellaswag', str(tmp_path / 'none.jsonl'))
    with pytest.raises(UserError, match='hellaswag/prepare.py'):
        evaluate(EvalConfig(out_dir=char_run, task='hellaswag', device='cpu'))


# --------------------------------------------------------------------------------------------------
# exported tokenizers

def exported_round_trip(tokenizer, text, folder, block_size):
    """The exported tokenizer, loaded by transformers, after checking it encodes text to our ids
    and decodes them back to the text."""
    from transformers import AutoTokenizer
    write_tokenizer(tokenizer, folder, block_size=block_size)
    hf = AutoTokenizer.from_pretrained(folder)
    ids = hf(text)['input_ids']
    assert ids == tokenizer.encode(text) and hf.decode(ids) == text
    return hf


@pytest.mark.slow
def test_exported_char_tokenizer_round_trips_all_of_shakespeare(char_tokenizer, shakespeare_text,
                                                                tmp_path):
    hf = exported_round_trip(char_tokenizer, shakespeare_text, tmp_path, block_size=64)
    for c in char_tokenizer.chars:  # each character alone, spaces and newlines included
        assert hf.encode(c) == char_tokenizer.encode(c) and hf.decode(hf.encode(c)) == c


@pytest.mark.slow
def test_exported_gpt2_bpe_matches_tiktoken_ids_on_all_of_shakespeare(gpt2_bpe, shakespeare_text,
                                                                      tmp_path):
    hf = exported_round_trip(gpt2_bpe, shakespeare_text, tmp_path, block_size=1024)
    # bytes beyond ASCII, split across tokens, and the end-of-text token
    odd = 'caf\u00e9 \u65e5\u672c \U0001f389<|endoftext|>  x'
    assert hf.encode(odd) == gpt2_bpe.encode(odd) and hf.decode(hf.encode(odd)) == odd
    assert hf.encode('ROMEO: I love') == [33676, 4720, 25, 314, 1842]


@pytest.mark.parametrize('vocab', ['char', pytest.param('bpe', marks=pytest.mark.slow)])
def test_pipeline_generates_from_an_exported_folder_as_our_model_does(vocab, char_tokenizer,
                                                                      request, tmp_path):
    from transformers import pipeline

    from nanogpt.generation import generate
    tokenizer = char_tokenizer if vocab == 'char' else request.getfixturevalue('gpt2_bpe')
    model = tiny_gpt(weight_scale=3, vocab_size=tokenizer.vocab_size, block_size=32).eval()
    export_hf(model, tmp_path, tokenizer)
    assert not {'vocab.json', 'tokenizer.json'}.isdisjoint(os.listdir(tmp_path))
    generator = pipeline('text-generation', model=str(tmp_path), device='cpu')
    text = generator('ROMEO: I', max_new_tokens=10, do_sample=False)[0]['generated_text']
    prompt = torch.tensor([tokenizer.encode('ROMEO: I')])
    ours = generate(model, prompt, 10, temperature=0.0)  # greedy
    assert text == tokenizer.decode(ours[0].tolist())


# --------------------------------------------------------------------------------------------------
# lm-evaluation-harness

LM_EVAL = r"""
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
folder, tasks_dir, out = sys.argv[1:]
r = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={folder},dtype=float32',
                            tasks=['ours'], task_manager=TaskManager(include_path=tasks_dir),
                            device='cpu', batch_size=4, log_samples=True)
samples = sorted(r['samples']['ours'], key=lambda s: s['doc_id'])
json.dump({'results': r['results']['ours'],
           'lls': [[resp[0] for resp in s['filtered_resps']] for s in samples]}, open(out, 'w'))
"""

TASK_YAML = """\
task: ours
dataset_path: json
dataset_kwargs:
  data_files: {path}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_lm_evaluation_harness_on_an_exported_model_agrees_with_our_scorer(
        gpt2_bpe, shakespeare_text, tmp_path):
    pytest.importorskip('lm_eval', reason='pip install "lm-eval[hf]"')
    model = tiny_gpt(weight_scale=3, vocab_size=gpt2_bpe.vocab_size, block_size=32).eval()
    export_hf(model, tmp_path / 'hf', gpt2_bpe)
    # 12 items, some cut from the left to the model's 32 tokens, as both sides do
    items = shakespeare_items(shakespeare_text, 12, context_chars=100, ending_chars=40)
    path = write_jsonl(items, tmp_path / 'items.jsonl')
    (tmp_path / 'tasks').mkdir()
    (tmp_path / 'tasks' / 'ours.yaml').write_text(TASK_YAML.format(path=path))
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1',
           'HF_DATASETS_CACHE': str(tmp_path / 'cache')}
    r = subprocess.run([sys.executable, '-c', LM_EVAL, str(tmp_path / 'hf'),
                        str(tmp_path / 'tasks'), str(tmp_path / 'lm_eval.json')],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / 'lm_eval.json') as f:
        theirs = json.load(f)
    ours = score(model, gpt2_bpe, load_items(path), batch_size=4)
    assert math.isclose(theirs['results']['acc,none'], ours['acc'], abs_tol=1e-6)
    assert math.isclose(theirs['results']['acc_norm,none'], ours['acc_norm'], abs_tol=1e-6)
    assert math.isclose(theirs['results']['acc_stderr,none'], ours['acc_stderr'], abs_tol=1e-6)
    for their_lls, our_lls in zip(theirs['lls'], ours['loglikelihoods'], strict=True):
        assert our_lls == pytest.approx(their_lls, abs=1e-4)


# --------------------------------------------------------------------------------------------------
# a multiple-choice set scored during training

def test_training_logs_the_multiple_choice_accuracy_of_each_evaluated_model(char_data,
                                                                            shakespeare_text,
                                                                            tmp_path):
    from conftest import metrics
    from nanogpt.checkpoint import load_model
    items = shakespeare_items(shakespeare_text, 12, context_chars=20, ending_chars=8)
    path = write_jsonl(items, tmp_path / 'mc.jsonl')
    out = tmp_path / 'out'
    train(tiny_train_config(out, char_data, max_iters=10, eval_interval=5, mc_eval_file=path,
                            dtype='float32'))  # as the checkpoint is scored below
    rows = [r for r in metrics(out) if 'val_loss' in r]
    # in the val loss's rows, at each evaluation (steps 0, 5, 10)
    assert [r['iter'] for r in rows] == [0, 5, 10] and all('mc_acc_norm' in r for r in rows)
    # the last is the accuracy of the model saved at that step, as eval.py's scorer finds it
    model, tokenizer, _ = load_model('resume', str(out), 'ckpt.pt')
    expected = score(model, tokenizer, items)
    assert rows[-1]['mc_acc'] == expected['acc']
    assert rows[-1]['mc_acc_norm'] == expected['acc_norm']
    # a missing file is refused before training starts, saying where HellaSwag's comes from
    with pytest.raises(UserError, match=r'hellaswag/val.jsonl not found: run `python data/hell'):
        train(tiny_train_config(tmp_path / 'out2', char_data, mc_eval_file=str(
            tmp_path / 'data' / 'hellaswag' / 'val.jsonl')))
    assert not (tmp_path / 'out2').exists()
