# Reproduce GPT-2 (124M) on OpenWebText with 8 GPUs. The reference ran this on one 8x A100 40GB node
# for ~4 days to a val loss of ~2.85 (its figures, not measured here).
# python data/openwebtext/prepare.py
# torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

out_dir = 'out-gpt2'
wandb_log = False  # True to follow the ~4-day run on wandb.ai (pip install -e .[wandb])
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

dataset = 'openwebtext'
# 12 sequences x 1024 tokens x 40 micro-steps (5 per GPU on 8 GPUs) = 491,520 tokens per step, ~0.5M
# as GPT-3 Small (Brown et al. 2020, table 2.1)
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# GPT-2 124M: 12 layers, 12 heads, 768 wide; no biases (a bit better and faster than GPT-2's)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # pretraining, as the reference run
bias = False

# 600k steps x 491,520 tokens = ~295B tokens
learning_rate = 6e-4  # GPT-3 Small's
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5  # learning_rate / 10
warmup_iters = 2000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95

eval_interval = 1000
eval_iters = 200  # 200 x 12 x 1024 = 2.5M tokens per split per evaluation
log_interval = 10
