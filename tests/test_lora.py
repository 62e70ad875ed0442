"""LoRA, finetuning a model trained here, and activation checkpointing: what each promises, as
comparisons with the model they change."""

import os

import pytest
import torch

import train
from conftest import fails, same_weights, tiny_gpt, tiny_train_config, weights
from nanogpt.checkpoint import load_checkpoint, load_model, model_from_checkpoint
from nanogpt.lora import LoRALinear, apply_lora, merge_lora


def lora_run(out_dir, base_dir, data_dir, **overrides):
    """A tiny LoRA finetune of the base run's best.pt, lr high enough to move the adapters."""
    args = dict(init_from=str(base_dir), lora_rank=4, lora_alpha=8.0, lora_targets='all',
                learning_rate=1e-2, max_iters=10, lr_decay_iters=10, warmup_iters=0,
                eval_interval=5)
    return tiny_train_config(out_dir, data_dir, **{**args, **overrides})


@pytest.fixture(scope='module')
def lora_out(trained_run, char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('lora')
    train.main(lora_run(out, trained_run, char_data))
    return out


def test_a_lora_model_at_init_computes_exactly_the_base_model():
    model = tiny_gpt(weight_scale=3)
    idx = torch.randint(0, 65, (2, 16))
    base_logits, _ = model(idx, idx)
    apply_lora(model, rank=4, alpha=8.0, targets='all')
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * 2  # 4 per block
    logits, _ = model(idx, idx)
    assert torch.equal(logits, base_logits)  # B = 0: the update adds exact zeros


def test_only_the_adapters_train_and_the_optimizer_holds_only_them(trained_run, lora_out):
    base, tuned = weights(trained_run, 'best.pt'), weights(lora_out, 'ckpt.pt')
    adapters = {k for k in tuned if '.lora_' in k}
    assert len(adapters) == 2 * 4 * 2  # A and B, 4 targets, 2 blocks
    assert same_weights(base, {k: v for k, v in tuned.items() if k not in adapters})
    assert all(tuned[k].abs().max() > 0 for k in adapters if k.endswith('lora_B'))
    ckpt = load_checkpoint(os.path.join(lora_out, 'ckpt.pt'))
    state = ckpt['optimizer']['state']
    assert sum(s['exp_avg'].numel() for s in state.values()) == \
        sum(tuned[k].numel() for k in adapters)


def test_merged_weights_compute_what_the_adapters_compute(lora_out):
    ckpt = load_checkpoint(os.path.join(lora_out, 'ckpt.pt'))
    unmerged = model_from_checkpoint(ckpt, dropout=0.0).eval()
    merged, _, _ = load_model('resume', str(lora_out), 'ckpt.pt')
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    idx = torch.randint(0, 65, (4, 32))
    a, _ = unmerged(idx, idx)
    b, _ = merged(idx, idx)
    assert (a - b).abs().max() < 1e-5
    # and merging really moved the weights away from the base model's
    assert not torch.equal(merge_lora(unmerged).transformer.h[0].attn.c_attn.weight,
                           ckpt['model']['transformer.h.0.attn.c_attn.weight'])


def test_the_exported_hugging_face_folder_computes_the_merged_model(lora_out, tmp_path):
    transformers = pytest.importorskip('transformers')
    from scripts import export_hf
    hf_dir = export_hf.main(export_hf.ExportConfig(out_dir=str(lora_out), ckpt='ckpt.pt',
                                                   hf_dir=str(tmp_path / 'hf')))
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    merged, _, _ = load_model('resume', str(lora_out), 'ckpt.pt')
    idx = torch.randint(0, 65, (2, 32))
    ours, _ = merged(idx, idx)
    with torch.no_grad():
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max() < 1e-5


def test_a_lora_run_resumes_bit_exactly(trained_run, char_data, tmp_path):
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    train.main(lora_run(straight, trained_run, char_data, lora_dropout=0.1, dropout=0.1))
    train.main(lora_run(split, trained_run, char_data, lora_dropout=0.1, dropout=0.1, max_iters=5))
    train.main(lora_run(split, trained_run, char_data, lora_dropout=0.1, dropout=0.1,
                        init_from='resume'))
    assert same_weights(weights(straight), weights(split))


def test_finetuning_a_checkpoint_of_ours_starts_from_its_weights(trained_run, char_data, tmp_path):
    # a full finetune of the base run's best.pt: its first evaluation is the base model's
    base = load_checkpoint(os.path.join(trained_run, 'best.pt'))
    result = train.main(tiny_train_config(tmp_path, char_data, init_from=str(trained_run),
                                          max_iters=1, eval_interval=1, learning_rate=1e-9))
    first = [r for r in map(__import__('json').loads, open(tmp_path / 'metrics.jsonl'))
             if 'val_loss' in r][0]
    assert first['iter'] == 0 and abs(first['val_loss'] - base['best_val_loss']) < 1e-6
    assert result['iter_num'] == 1


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    grads, losses = [], []
    for checkpointing in (False, True):
        model = tiny_gpt(weight_scale=3, dropout=0.1).train()
        model.checkpoint_blocks = checkpointing
        idx = torch.randint(0, 65, (4, 16), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)  # the same dropout masks; the recompute replays them
        _, loss = model(idx, idx)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert abs(losses[0] - losses[1]) < 1e-6
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) < 1e-6


@pytest.mark.parametrize('extra, says', [
    (['--lora_rank=4'], 'init_from'),
    (['--lora_rank=4', '--init_from=gpt2', '--lora_targets=attn.q'], 'lora_targets'),
    (['--init_from=no/such/run'], 'init_from must be'),
])
def test_lora_and_init_from_mistakes_are_one_line_errors(extra, says, tmp_path, char_data, capsys):
    args = [f'--out_dir={tmp_path}', f'--data_dir={char_data}', '--dataset=shakespeare_char',
            '--device=cpu', *extra]
    assert says in fails(train, train.TrainConfig, args, tmp_path, capsys)


def test_a_char_model_cannot_be_finetuned_on_bpe_data(trained_run, bpe_data, tmp_path, capsys):
    args = [f'--out_dir={tmp_path}', f'--data_dir={bpe_data}', '--dataset=shakespeare',
            '--device=cpu', f'--init_from={trained_run}', '--block_size=32']
    assert 'vocabulary' in fails(train, train.TrainConfig, args, tmp_path, capsys)
