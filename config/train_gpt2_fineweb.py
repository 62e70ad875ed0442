# GPT-2 (124M) on FineWeb-Edu's 10B-token sample, following llm.c's published GPT-2 124M recipe
# (karpathy/llm.c discussion #481, scripts/run_gpt2_124M.sh). Their figures, not measured here: on
# FineWeb 10B, one node of 8x A100 80GB for ~90 minutes, HellaSwag 29.9 against 29.4 for OpenAI's
# GPT-2 124M (scored as llm.c scores it; our data/hellaswag uses lm-evaluation-harness's scoring,
# where OpenAI's GPT-2 124M gets acc_norm 0.3114: see docs/benchmarks.md).
# python data/fineweb_edu/prepare.py && python data/hellaswag/prepare.py
# torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py
import os

out_dir = 'out-gpt2-fineweb'
wandb_log = False  # True to follow the run on wandb.ai (pip install wandb)
wandb_project = 'fineweb'
wandb_run_name = 'gpt2-124M-fineweb-edu'

dataset = 'fineweb_edu'
# llm.c: 524,288 tokens (2**19) per step, in micro-batches of 64 x 1024 on 80 GB GPUs (-b 64 -t 1024
# -d 524288). Here 32 x 1024 x 16 micro-steps (2 per GPU on 8), which fits 40 GB; on 80 GB GPUs,
# batch_size = 64 and gradient_accumulation_steps = 8 are the same step, faster
batch_size = 32
block_size = 1024
gradient_accumulation_steps = 16

# GPT-2 124M as llm.c's d12: GPT-2's architecture, biases included
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True

# llm.c: lr 6e-4 (-l), 700 warm-up steps (-u), decay to 0 (-q 0.0), weight decay 0.1 (-c), AdamW
# (0.9, 0.95), clip 1.0; one epoch of the ~10B tokens: 10e9 / 524,288 = 19,073 steps
learning_rate = 6e-4
max_iters = 19073
lr_decay_iters = 19073
warmup_iters = 700
min_lr = 0.0
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

# llm.c evaluates every 250 steps (-v 250), HellaSwag included (-h 1)
eval_interval = 250
eval_iters = 20  # 20 x 32 x 1024 = 655k tokens per split per process per evaluation
log_interval = 10
# HellaSwag's acc and acc_norm beside the val loss (metrics.jsonl), once its file is prepared
mc_eval_file = ('data/hellaswag/val.jsonl' if os.path.isfile('data/hellaswag/val.jsonl')
                else '')
