"""A byte-level BPE of your own: learned from the train split alone, any text round-trips through
it byte for byte, and its vocabulary travels everywhere: the prepared bins, a checkpoint's
tokenizer and transformers' AutoTokenizer on the export give the same ids, and a model of it can be
finetuned to chat."""

import io
import json
import math
import os
import pickle
import sys

import numpy as np
import pytest
import torch

import train
from conftest import metrics, run_script, tiny_train_config
from nanogpt.chat_format import END, SPECIAL, chat_vocab, parse, prompt, render
from nanogpt.errors import UserError
from nanogpt.tokenizer import EOT, Tokenizer, train_bpe

# every kind of character UTF-8 has: 1 byte (all of ASCII, the controls too), 2 (Latin, Greek,
# Cyrillic...: every continuation byte), 3 (each lead byte: CJK, symbols...), 4 (emoji and beyond)
ALL_KINDS = (''.join(map(chr, range(0x800))) + ''.join(chr(max(0x800, 0x1000 * k + 0x100))
                                                       for k in range(16))
             + ''.join(chr(0x10000 * max(1, 4 * k)) for k in range(5))
             + 'naïve café ☕ 日本語 🦜👩‍💻 \r\n\t  spaces  \n\n')


def read_bins(data_dir):
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    return meta, {s: np.fromfile(os.path.join(data_dir, f'{s}.bin'), dtype=np.uint16).tolist()
                  for s in ('train', 'val')}


def train_text(text):
    return text[:int(len(text) * 0.9)]  # the prepare scripts' split: the first 90% is train


@pytest.fixture(scope='module')
def bpe512(shakespeare_text):
    return Tokenizer(train_bpe([train_text(shakespeare_text)], 512))


def test_ids_are_the_bytes_then_the_merges_then_end_of_text(bpe512):
    enc = bpe512.enc
    assert bpe512.vocab_size == 512 and bpe512.eot_token == 511
    assert [enc.decode_single_token_bytes(i) for i in range(256)] == [bytes([b]) for b in
                                                                      range(256)]
    merges = bpe512.spec['merges']  # token 256 + k is the tokens a and b of merge k joined
    assert len(merges) == 255 and all(a < 256 + k and b < 256 + k for k, (a, b) in
                                      enumerate(merges))
    for k, (a, b) in enumerate(merges):
        assert enc.decode_single_token_bytes(256 + k) == (enc.decode_single_token_bytes(a)
                                                          + enc.decode_single_token_bytes(b))
    assert bpe512.decode([256]).strip()  # the first merge is a frequent pair of Shakespeare's
    assert bpe512.encode(EOT) == [511] and bpe512.encode(EOT, allow_special=False) != [511]


def test_every_byte_value_and_all_of_tiny_shakespeare_round_trip(bpe512, shakespeare_text):
    for text in (shakespeare_text, ALL_KINDS, EOT.join(['a', 'b c', ''])):
        ids = bpe512.encode(text)
        assert bpe512.decode(ids) == text
        # each token stands for its bytes: together exactly the text's, none unknown
        n_bytes, _ = bpe512.text_sizes()
        assert sum(n_bytes[i] for i in ids) == len(text.replace(EOT, '').encode('utf-8'))
    used = {b for i in bpe512.encode(ALL_KINDS) for b in bpe512.enc.decode_single_token_bytes(i)}
    # every byte that UTF-8 text can hold: all but 0xC0, 0xC1 and 0xF5..0xFF
    assert used == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}
    # Shakespeare's own text takes fewer tokens than bytes, text it never saw one token a byte
    assert len(bpe512.encode(shakespeare_text)) < len(shakespeare_text) / 2
    assert len(bpe512.encode('日本語')) == len('日本語'.encode('utf-8'))


def test_a_corpus_encodes_in_parallel_parts_to_the_ids_of_the_whole(bpe512, shakespeare_text,
                                                                    gpt2_bpe):
    # cut points only between non-space characters: spaces before a newline stay with it
    text = (shakespeare_text + '  \nend \n\n Tail\t\n'
            + shakespeare_text[:300_000].replace('\n', ' \n'))
    for tok in (bpe512, gpt2_bpe):
        assert tok.encode_corpus(text, threads=2) == tok.encode(text)


def test_the_bpe_is_learned_from_the_train_split_only(tmp_path, shakespeare_text):
    """A word found only in val never becomes a token; learned from the whole text, it would."""
    text = shakespeare_text[:200_000] + ' qwzyx' * 3_000  # all of it in the last 10%: val
    assert text.index(' qwzyx') > len(train_text(text))
    path = tmp_path / 'text.txt'
    path.write_text(text)
    r = run_script('data/text/prepare.py', '--input', str(path), '--tokenizer=bpe',
                   '--vocab_size=1024', '--out_dir', str(tmp_path / 'data'))
    assert r.returncode == 0, r.stderr
    meta, ids = read_bins(tmp_path / 'data')
    tok = Tokenizer(meta['vocab'])
    assert max(len(tok.enc.decode_single_token_bytes(i)) for i in ids['val'][-100:]) == 1
    assert not any(b'qw' in tok.enc.decode_single_token_bytes(i) for i in range(tok.vocab_size - 1))
    seen = Tokenizer(train_bpe([text], 1024))  # the same, had it seen val
    assert any(b'qwzyx' in seen.enc.decode_single_token_bytes(i) for i in range(1023))


@pytest.fixture(scope='module')
def bpe_run(tmp_path_factory, shakespeare_text):
    """data/shakespeare_bpe prepared with 512 tokens from the real corpus, and a tiny model
    trained on it: (data folder, run folder)."""
    import shutil

    from conftest import SHAKESPEARE
    tmp = tmp_path_factory.mktemp('bpe')
    shutil.copy(SHAKESPEARE, tmp / 'input.txt')
    r = run_script('data/shakespeare_bpe/prepare.py', '--input', str(tmp / 'input.txt'),
                   '--out_dir', str(tmp / 'data'), '--vocab_size', '512')
    assert r.returncode == 0, r.stderr
    train.main(tiny_train_config(tmp / 'out', tmp / 'data', dataset='shakespeare_bpe',
                                 max_iters=40, lr_decay_iters=40, eval_interval=20))
    return tmp / 'data', tmp / 'out'


@pytest.mark.slow
def test_the_bins_the_checkpoint_and_the_hugging_face_export_give_the_same_ids(bpe_run,
                                                                               shakespeare_text,
                                                                               tmp_path):
    transformers = pytest.importorskip('transformers')
    from nanogpt.checkpoint import load_model
    from scripts.export_hf import ExportConfig
    from scripts.export_hf import main as export
    data, out = bpe_run
    meta, bins = read_bins(data)
    model, ours, ckpt = load_model(out_dir=str(out))  # loaded with weights_only=True
    assert ckpt['vocab'] == meta['vocab'] and meta['vocab_size'] == ours.vocab_size == 512
    assert model.config.vocab_size == 512  # the padded rows (512 is a multiple of 64 already)
    # what a checkpoint carries for it: the merges as pairs of ids, a few bytes each
    assert len(pickle.dumps(ckpt['vocab'])) < 12 * len(ckpt['vocab']['merges']) + 1000
    theirs = transformers.AutoTokenizer.from_pretrained(
        export(ExportConfig(out_dir=str(out), hf_dir=str(tmp_path / 'hf'))))
    train, val = train_text(shakespeare_text), shakespeare_text[len(train_text(shakespeare_text)):]
    for split, text in (('train', train), ('val', val)):
        assert bins[split] == ours.encode(text) == theirs(text)['input_ids']
    for text in (ALL_KINDS, f'one{EOT}two'):
        ids = ours.encode(text)
        assert theirs(text)['input_ids'] == ids and theirs.decode(ids) == text
    # the model learned from these ids: its val loss is below a uniform guess's, ln 512
    x, y = torch.tensor([bins['val'][:32]]), torch.tensor([bins['val'][1:33]])
    assert model(x, y)[1] < math.log(512) - 0.5


def test_a_model_of_its_own_bpe_samples_and_is_measured_in_bits_per_byte(bpe_run,
                                                                          shakespeare_text):
    import eval as evaluate
    import sample
    data, out = bpe_run
    texts = sample.main(sample.SampleConfig(out_dir=str(out), start='ROMEO:', num_samples=1,
                                            max_new_tokens=10, device='cpu', seed=1))
    assert texts[0].startswith('ROMEO:') and len(texts[0]) > len('ROMEO:')
    results = evaluate.main(evaluate.EvalConfig(out_dir=str(out), data_dir=str(data),
                                                bleu_samples=0, device='cpu'))
    meta, bins = read_bins(data)
    assert results['unit'] == 'byte' and results['tokens'] == meta['val_tokens']
    # the val split's bytes, less the first token's (it is context only, never scored)
    first = len(Tokenizer(meta['vocab']).enc.decode_single_token_bytes(bins['val'][0]))
    val = shakespeare_text[len(train_text(shakespeare_text)):]
    assert results['scored_bytes'] == len(val.encode('utf-8')) - first
    assert results['bits_per_byte'] == pytest.approx(
        results['bits_per_token'] * results['scored_tokens'] / results['scored_bytes'])


@pytest.mark.slow
def test_sft_of_a_model_of_its_own_bpe_learns_the_chat_and_exports_it(bpe_run, tmp_path,
                                                                       monkeypatch):
    """The chat tokens go after its ids (512..515); SFT lowers the assistant loss, and chat turns
    read the same in transformers."""
    transformers = pytest.importorskip('transformers')
    from nanogpt.checkpoint import load_model
    from scripts.export_hf import ExportConfig
    from scripts.export_hf import main as export
    from test_chat import held_out_questions, prepare_chat
    data, base = bpe_run
    chat = prepare_chat(tmp_path / 'chat', base)
    meta, _ = read_bins(chat)
    assert meta['vocab'] == chat_vocab(read_bins(data)[0]['vocab'])
    train.main(tiny_train_config(tmp_path / 'sft', chat, dataset='secret_words',
                                 init_from=str(base), max_iters=60, lr_decay_iters=60,
                                 eval_interval=30, eval_iters=10))
    losses = [row['val_loss'] for row in metrics(tmp_path / 'sft') if 'val_loss' in row]
    assert losses[-1] < losses[0] - 0.5
    model, tok, _ = load_model(out_dir=str(tmp_path / 'sft'))
    assert [tok.special[s] for s in SPECIAL] == [512, 513, 514, 515] and tok.vocab_size == 516
    question, answer = held_out_questions()[0]
    messages = [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': answer}]
    assert parse(tok, render(tok, messages)[0]) == messages
    theirs = transformers.AutoTokenizer.from_pretrained(
        export(ExportConfig(out_dir=str(tmp_path / 'sft'), hf_dir=str(tmp_path / 'hf'))))
    ids = prompt(tok, messages[:1])
    assert theirs(tok.decode(ids))['input_ids'] == ids  # the turn tokens are read as tokens
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / 'hf')
    assert hf.config.eos_token_id == tok.special[END]
    import chat  # and chat.py talks to it
    monkeypatch.setattr('sys.stdin', io.StringIO(question + '\n'))
    said = chat.main(chat.ChatConfig(out_dir=str(tmp_path / 'sft'), device='cpu', max_new_tokens=8,
                                     temperature=0))
    assert [m['role'] for m in said] == ['user', 'assistant'] and said[0]['content'] == question


@pytest.mark.parametrize('text, vocab_size, why', [
    ('To be, or not to be.\n' * 50, 200, 'vocab_size 200 is too small for a byte-level BPE'),
    ('To be, or not to be.\n' * 50, 2048, 'the text supports only 268 tokens'),
    ('', 512, 'holds no text'),
    (' \n\n', 512, 'holds no text')])
def test_prepare_refuses_a_vocabulary_the_text_cannot_have_in_one_line(tmp_path, text,
                                                                      vocab_size, why):
    (tmp_path / 'in.txt').write_text(text)
    r = run_script('data/text/prepare.py', '--input', str(tmp_path / 'in.txt'), '--tokenizer=bpe',
                   f'--vocab_size={vocab_size}', '--out_dir', str(tmp_path / 'data'))
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and why in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / 'data')


def test_training_a_bpe_names_the_extra_it_needs_and_a_bad_spec_is_refused(monkeypatch):
    with pytest.raises(UserError, match='the input text is empty'):
        train_bpe(['', ' \n'], 512)
    with pytest.raises(UserError, match='does not fit uint16'):
        train_bpe(['hi'], 2**16 + 1)
    good = train_bpe(['to be or not to be'], 259)
    for merges in ([[0, 300]], [[116, 111], [116, 111]], [['t', 'o']]):
        with pytest.raises(UserError, match='the BPE vocabulary is malformed'):
            Tokenizer({**good, 'merges': merges})
    monkeypatch.setitem(sys.modules, 'tokenizers', None)  # as if not installed
    with pytest.raises(UserError, match=r'pip install -e \.\[data\]'):
        train_bpe(['hi'], 512)


@pytest.mark.slow
def test_the_comparison_script_measures_bits_per_byte_of_each_tokenizer(tmp_path):
    from conftest import SHAKESPEARE
    from scripts.compare_tokenizers import CompareConfig
    from scripts.compare_tokenizers import main as compare
    rows = compare(CompareConfig(input=SHAKESPEARE, work=str(tmp_path), tokenizers='char,300',
                                 max_iters=2))
    char, bpe = rows
    assert (char['tokenizer'], char['vocab_size'], char['bytes_per_token']) == ('char', 65, 1.0)
    assert bpe['vocab_size'] == 300 and 1.2 < bpe['bytes_per_token'] < 2
    assert bpe['bytes_seen'] == pytest.approx(2 * 12 * 64 * bpe['bytes_per_token'])
    for r in rows:  # two steps from the init: about ln(vocab) nats a token, spread over its bytes
        assert abs(r['val_loss'] - math.log(r['vocab_size'])) < 1
        assert r['val_bits_per_byte'] == pytest.approx(
            r['val_loss'] / math.log(2) / r['bytes_per_token'], rel=0.05)
    assert json.loads((tmp_path / 'results.json').read_text())['results'] == rows
