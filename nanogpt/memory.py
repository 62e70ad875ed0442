"""
How much memory a training run needs per device, before launching it: parameters, gradients,
optimizer state and activations, for one process, DDP or FSDP over N processes, LoRA and
activation checkpointing. bench.py --memory=True prints it beside what its steps really took.

Counted in bytes, with fp32 weights (the master copy, also under bf16 autocast):
- parameters: 4 per parameter; FSDP keeps 1/N of them, plus the whole weights of the block being
  run and of the one prefetched, and the root's (embeddings, head) unsharded while they are used,
  and its communication buffers (measured: about one more shard).
- gradients: 4 per trainable parameter (1/N under FSDP); DDP all-reduces them through buckets of
  the same size, a second copy.
- optimizer: AdamW's two moments, 8 per trainable parameter (1/N under FSDP); Muon's momentum, 4.
- activations, per token of one micro-batch (B x T tokens; the tensors alive, which is what a
  process holds: device.setup makes a CPU one return freed memory at once), what backward keeps
  of a block of width C: the inputs of its two norms (the residual stream, fp32) and 14C values
  at the activation dtype's size e: the inputs of its four Linears (C, C, C and the 4C GELU
  output), q, k, v and attention's output (4C) and the GELU's input (4C). A frozen Linear
  without an adapter keeps no input (it needs no weight gradient). Activation checkpointing keeps
  only each block's input (fp32) and recomputes one block at a time in backward. The head keeps
  the log-softmax of the logits (fp32, V per token), and its backward makes three more of that
  size (its gradient, its exp and the logits' gradient).
Gradients are made in backward while activations are freed, and set to None after each step, so
with one micro-step per step the peak is the larger of (activations + the head's transients) and
gradients, on top of the weights and optimizer state; with several, the later micro-steps run
beside the gradients of the earlier ones: both. tests/test_memory.py checks each term against
what PyTorch allocates; docs/finetuning.md sets whole estimates beside measured peaks.
"""

from dataclasses import dataclass

from nanogpt.lora import TARGETS, parse_targets


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations: float
    runtime: float  # the process itself: a CPU process's interpreter and libraries
    accumulates: bool  # several micro-steps per step: gradients live beside activations

    @property
    def total(self):
        grads_and_activations = (self.grads + self.activations if self.accumulates
                                 else max(self.grads, self.activations))
        return self.params + self.optimizer + self.runtime + grads_and_activations


def estimate_memory(cfg, model, world_size=1, parallelism='ddp', device_type='cpu',
                    dtype='float32'):
    """The peak memory of one process training the GPT `model` (on any device, the meta one
    included: only shapes are read) with the train.py config cfg."""
    L, V = cfg.n_layer, model.config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    fsdp = world_size > 1 and parallelism == 'fsdp'
    shards = world_size if fsdp else 1
    params = 4 * n_params / shards
    if fsdp:
        block = sum(p.numel() for p in model.transformer.h[0].parameters())
        root = n_params - L * block
        params += 4 * (2 * block + root) * (1 - 1 / shards)
        # FSDP's flat communication buffers (all-gather in, reduce-scatter out): measured as about
        # one more shard of the weights (docs/finetuning.md), not derived
        params += 4 * n_params / shards
    grads = 4 * n_trainable / shards
    if world_size > 1 and parallelism == 'ddp':
        grads *= 2  # the all-reduce buckets
    n_muon = (sum(p.numel() for p in model.transformer.h.parameters()
                  if p.requires_grad and p.dim() == 2) if cfg.optimizer == 'muon' else 0)
    optimizer = (8 * (n_trainable - n_muon) + 4 * n_muon) / shards

    kept, transient = activation_bytes(cfg, V, dtype)
    activations = kept + transient
    # what a CPU process holds before any model: Python, torch, numpy (measured ~0.27 GiB)
    runtime = 0.3 * 2**30 if device_type == 'cpu' else 0
    accumulates = cfg.gradient_accumulation_steps // world_size > 1
    return MemoryEstimate(params, grads, optimizer, activations, runtime, accumulates)


def activation_bytes(cfg, vocab_size, dtype='float32'):
    """(kept, transient): the bytes of activations that one micro-batch's forward pass keeps for
    backward, and the most that backward adds on top (the head's gradients; with activation
    checkpointing, the block being recomputed)."""
    C, L, V = cfg.n_embd, cfg.n_layer, vocab_size
    e = 2 if dtype in ('bfloat16', 'float16') else 4
    per_block = 4 * 2 * C + e * 14 * C  # bytes per token
    if cfg.lora_rank:  # frozen Linears without adapters keep no input
        adapted = parse_targets(cfg.lora_targets)
        widths = dict(zip(TARGETS, (C, C, C, 4 * C)))
        per_block -= e * sum(w for t, w in widths.items() if t not in adapted)
    head = 4 * V + (4 + e) * C  # the log-softmax, ln_f's input and output
    head_backward = 3 * 4 * V  # the log-softmax's gradient, its exp, the logits' gradient
    tokens = cfg.batch_size * cfg.block_size
    # LoRA freezes the embeddings: no gradient flows into the first block's input, nothing keeps it
    first = 0 if cfg.lora_rank else 4 * C
    if cfg.activation_checkpointing:  # every block's input, and one block recomputed at a time
        return tokens * (4 * C * (L - 1) + first + head), tokens * (per_block + head_backward)
    return tokens * (per_block * L - 4 * C + first + head), tokens * head_backward
