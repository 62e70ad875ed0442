"""GPT-2 in and out: OpenAI's weights through transformers, export to Hugging Face, finetuning.

A tiny randomly initialised transformers GPT2LMHeadModel, saved to a folder, stands in for the
released GPT-2 checkpoints (which would need the network): from_pretrained reads a local folder the
same way.
"""

import json
import os
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import same_weights, tiny_gpt, tiny_train_config
from nanogpt.checkpoint import load_checkpoint, model_from_checkpoint
from nanogpt.errors import UserError
from nanogpt.generation import generate
from nanogpt.hf import export_hf, from_pretrained
from nanogpt.tokenizer import GPT2_VOCAB
from sample import SampleConfig
from sample import main as sample
from scripts.export_hf import ExportConfig
from scripts.export_hf import main as export
from train import main as train


def randomize(model):
    """Weights far from their init (LayerNorm gains 1, biases 0), so that a weight copied to the
    wrong place, or not transposed, changes the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.1)
    return model


@pytest.fixture(scope='module')
def hf_gpt2(tmp_path_factory):
    """A local Hugging Face GPT-2 folder: GPT-2's vocabulary, but tiny, with 64 positions, and a
    shape (4 heads, 48 wide, biases) other than tiny_train_config's (2 heads, 32 wide, no
    biases)."""
    folder = str(tmp_path_factory.mktemp('hf_gpt2'))
    config = GPT2Config(n_layer=2, n_head=4, n_embd=48, n_positions=64, vocab_size=50257)
    hf = randomize(GPT2LMHeadModel(config)).eval()
    hf.save_pretrained(folder)
    return folder, hf


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx, targets=idx)[0]  # with targets: logits at every position


def test_from_pretrained_computes_what_transformers_computes(hf_gpt2):
    folder, hf = hf_gpt2
    model = from_pretrained(folder)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, c.bias, c.dropout) == \
        (2, 4, 48, 64, 50257, True, 0.0)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    assert (our_logits(model, idx) - hf_logits(hf, idx)).abs().max().item() < 1e-4
    assert from_pretrained(folder, dropout=0.1).config.dropout == 0.1  # the one override


def test_round_trip_ours_to_hugging_face_to_ours_is_identical(tmp_path):
    torch.manual_seed(0)
    model = randomize(tiny_gpt())
    export_hf(model, tmp_path)
    back = from_pretrained(str(tmp_path))
    assert back.config == model.config
    assert same_weights(model.state_dict(), back.state_dict())


def test_export_without_biases_loads_in_transformers_and_computes_the_same(tmp_path):
    # a character-level model of our own (65 tokens, 16 positions, no biases): transformers must
    # compute exactly what it computes, with zero biases in place of the missing ones
    model = randomize(tiny_gpt(bias=False))
    export_hf(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ['config.json', 'model.safetensors']
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 65, (3, 16), generator=torch.Generator().manual_seed(0))
    assert (our_logits(model, idx) - hf_logits(hf, idx)).abs().max().item() < 1e-4
    ours = model.state_dict()
    for k, v in from_pretrained(str(tmp_path)).state_dict().items():
        # the added biases are zeros
        assert torch.equal(v, ours[k]) if k in ours else not v.any(), k


def test_from_pretrained_says_what_to_install_and_which_names_exist(monkeypatch, hf_gpt2):
    monkeypatch.setitem(sys.modules, 'transformers', None)  # makes `import transformers` fail
    with pytest.raises(UserError, match=r'pip install -e \.\[hf\]'):  # the extra that has it
        from_pretrained(hf_gpt2[0])
    with pytest.raises(UserError, match="is neither one of gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                                        "nor a folder"):
        from_pretrained('gpt3')


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory, hf_gpt2, bpe_data):
    """The tiny 'GPT-2' finetuned on BPE Shakespeare with 32-token contexts, and its loss before."""
    out = tmp_path_factory.mktemp('finetune')
    kw = dict(dataset='shakespeare', init_from=hf_gpt2[0], block_size=32, batch_size=4,
              learning_rate=3e-3, decay_lr=False, max_iters=15, eval_interval=15, eval_iters=4)
    at_start = tiny_train_config(out / 'before', bpe_data, **kw, eval_only=True)
    before = train(at_start)['losses']['val']
    after = train(tiny_train_config(out, bpe_data, **kw))['losses']['val']
    return str(out), before, after


@pytest.mark.slow
def test_finetuning_gpt2_on_bpe_shakespeare_lowers_the_loss(finetuned, bpe_data):
    out_dir, before, after = finetuned
    assert after < before - 1.0
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    # the shape is the pretrained model's, not the run config's; positions cropped from 64 to 32
    assert ckpt['model_args'] == dict(n_layer=2, n_head=4, n_embd=48, block_size=32,
                                      vocab_size=50257, dropout=0.0, bias=True)
    assert ckpt['vocab'] == GPT2_VOCAB and ckpt['iter_num'] == 15
    # resuming needs no init_from or shape: the checkpoint has them
    resumed = train(tiny_train_config(out_dir, bpe_data, dataset='shakespeare', init_from='resume',
                                      block_size=32, batch_size=4, max_iters=18, eval_interval=18,
                                      eval_iters=4))
    assert resumed['iter_num'] == 18
    assert load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['model_args'] == ckpt['model_args']


def test_init_from_gpt2_refuses_a_char_dataset_and_too_long_a_context(tmp_path, hf_gpt2, char_data,
                                                                      bpe_data):
    with pytest.raises(UserError, match="reads GPT-2's BPE, but dataset 'shakespeare_char' has a "
                                        "char vocabulary"):
        train(tiny_train_config(tmp_path, char_data, init_from=hf_gpt2[0], eval_only=True))
    with pytest.raises(UserError, match='has 64 positions, fewer than block_size 128: use '
                                        '--block_size=64'):
        train(tiny_train_config(tmp_path, bpe_data, dataset='shakespeare', init_from=hf_gpt2[0],
                                block_size=128))


def test_sampling_a_gpt2_folder_greedily_continues_as_transformers_does(hf_gpt2, gpt2_bpe):
    folder, hf = hf_gpt2
    prompt = gpt2_bpe.encode('ROMEO:')
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0].tolist()
    samples = sample(SampleConfig(init_from=folder, start='ROMEO:', num_samples=1,
                                  max_new_tokens=10, temperature=0.0, device='cpu'))
    assert samples == [gpt2_bpe.decode(expected)]


@pytest.mark.slow
def test_sampling_a_finetuned_checkpoint_decodes_its_tokens_with_gpt2_bpe(finetuned, gpt2_bpe):
    out_dir, _, _ = finetuned
    s = sample(SampleConfig(out_dir=out_dir, ckpt='ckpt.pt', start='ROMEO:', num_samples=1,
                            max_new_tokens=10, temperature=0.0, dtype='float32', device='cpu'))[0]
    model = model_from_checkpoint(load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))).eval()
    prompt = gpt2_bpe.encode('ROMEO:')
    with torch.no_grad():
        ids = generate(model, torch.tensor([prompt]), 10, temperature=0.0)[0, len(prompt):]
    assert s == 'ROMEO:' + gpt2_bpe.decode(ids.tolist())


@pytest.mark.slow
def test_export_script_writes_a_folder_transformers_loads(finetuned, tmp_path):
    out_dir, _, _ = finetuned
    hf_dir = export(ExportConfig(out_dir=out_dir, ckpt='best.pt', hf_dir=str(tmp_path / 'hf')))
    with open(os.path.join(hf_dir, 'config.json')) as f:
        config = json.load(f)
    assert (config['n_positions'], config['eos_token_id'], config['model_type']) == \
        (32, 50256, 'gpt2')
    model = model_from_checkpoint(load_checkpoint(os.path.join(out_dir, 'best.pt')))
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    assert (our_logits(model, idx) - hf_logits(hf, idx)).abs().max().item() < 1e-4


def test_eval_of_a_gpt2_folder_matches_the_loss_transformers_computes(hf_gpt2, bpe_data, tmp_path):
    import numpy as np

    from eval import EvalConfig
    from eval import main as evaluate
    folder, hf = hf_gpt2
    result = evaluate(EvalConfig(init_from=folder, dataset='shakespeare', data_dir=bpe_data,
                                 out_dir=str(tmp_path), max_tokens=65, bleu_samples=0,
                                 device='cpu'))
    val = np.fromfile(os.path.join(bpe_data, 'val.bin'), dtype=np.uint16)
    ids = torch.from_numpy(val[:65].astype(np.int64))
    logits = hf_logits(hf, ids[None, :64])[0]
    # one window: 64 tokens scored
    expected = torch.nn.functional.cross_entropy(logits, ids[1:]).item()
    assert result['scored_tokens'] == 64 and abs(result['loss'] - expected) < 1e-4
    assert os.path.isfile(tmp_path / f'eval_{os.path.basename(folder)}_val.json')
