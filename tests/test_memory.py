"""memory.py's estimate, term by term, against what PyTorch really allocates for a small model:
the tensors autograd keeps for backward, the gradients and the optimizer's state. (The peaks of
whole processes, large models included, are measured by bench.py --memory=True:
docs/finetuning.md.)"""

import dataclasses

import pytest
import torch

from conftest import tiny_train_config
from model import GPT, GPTConfig
from nanogpt.lora import apply_lora
from nanogpt.memory import activation_bytes, estimate_memory
from nanogpt.optimizers import configure_optimizers

CFG = tiny_train_config('', '', n_layer=4, n_head=4, n_embd=64, block_size=64, batch_size=4)
VOCAB = 512


def model_for(cfg):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          block_size=cfg.block_size, vocab_size=VOCAB, bias=False))
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    model.checkpoint_blocks = cfg.activation_checkpointing
    return model


def kept_for_backward(model, cfg):
    """The bytes of the tensors autograd keeps after a forward pass, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    idx = torch.randint(0, VOCAB, (cfg.batch_size, cfg.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(kept.values())


@pytest.mark.parametrize('changes', [
    {}, {'activation_checkpointing': True},
    {'lora_rank': 8}, {'lora_rank': 8, 'lora_targets': 'all'},
    {'lora_rank': 8, 'activation_checkpointing': True},
], ids=['full', 'checkpointing', 'lora-attn', 'lora-all', 'lora-checkpointing'])
def test_the_activations_kept_for_backward_are_the_estimated_ones(changes):
    cfg = dataclasses.replace(CFG, **changes)
    measured = kept_for_backward(model_for(cfg).train(), cfg)
    kept, _ = activation_bytes(cfg, VOCAB)
    # within 3%: small tensors (attention's log-sum-exp, LoRA's rank-8 products) are left out
    assert abs(kept / measured - 1) < 0.03, (kept, measured)


@pytest.mark.parametrize('changes', [{}, {'lora_rank': 8}], ids=['full', 'lora'])
def test_gradients_and_optimizer_state_are_the_estimated_bytes(changes):
    cfg = dataclasses.replace(CFG, **changes)
    model = model_for(cfg)
    optimizer = configure_optimizers(model, cfg, 'cpu')
    idx = torch.randint(0, VOCAB, (2, 16))
    model(idx, idx)[1].backward()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for k, t in s.items() if k != 'step')
    est = estimate_memory(cfg, model)
    assert (est.grads, est.optimizer) == (grads, state)
    assert est.params == 4 * sum(p.numel() for p in model.parameters())
    # FSDP on 4 processes: a quarter of each, plus the blocks and the root gathered while used
    fsdp = estimate_memory(cfg, model, world_size=4, parallelism='fsdp')
    assert (fsdp.grads, fsdp.optimizer) == (grads / 4, state / 4)
    assert est.params / 4 < fsdp.params < est.params
