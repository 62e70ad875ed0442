# Finetune OpenAI's GPT-2 XL (1.5B) on tiny Shakespeare with LoRA: the 1.5B weights stay frozen
# and only rank-8 adapters of each attention's matrices train (lora.py). docs/finetuning.md.
# python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare_lora.py
# python sample.py --out_dir=out-shakespeare-lora --start="ROMEO:"
# Memory: the full finetune (config/finetune_shakespeare.py) needs ~25 GB for weights, gradients
# and AdamW's state before activations; this one ~6.5 GB (weights) + activations: with
# activation checkpointing a step fits in 24 GB on a GPU, or on a CPU (slowly). Check yours first:
#   python bench.py config/finetune_shakespeare_lora.py --init_from=scratch --n_layer=48 \
#       --n_head=25 --n_embd=1600 --memory=True --bench_iters=0

out_dir = 'out-shakespeare-lora'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'lora-gpt2-xl'

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # or 'gpt2', 'gpt2-medium', 'gpt2-large', or a run of ours (its out_dir)
always_save_checkpoint = False  # only save when val improves

lora_rank = 8  # gpt2-xl: 3.7M trainable parameters, 0.24% of its 1.56B; AdamW state 29 MB
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = 'attn.c_attn,attn.c_proj'  # q, k, v and the output; add mlp.c_fc,mlp.c_proj
activation_checkpointing = True  # ~1/3 more compute for activations of one block, not 48

# as the full finetune: 1 x 1024 tokens x 32 micro-steps = 32,768 tokens per step
batch_size = 1
block_size = 1024
gradient_accumulation_steps = 32
max_iters = 20

# adapters start at zero and are small: LoRA takes a learning rate ~10x a full finetune's
learning_rate = 3e-4
decay_lr = False
weight_decay = 0.0
