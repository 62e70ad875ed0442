# Finetune OpenAI's GPT-2 XL (1.5B) on tiny Shakespeare in GPT-2's BPE,
# with a small constant learning rate.
# python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare.py
# python sample.py --out_dir=out-shakespeare --start="ROMEO:"
# Needs one GPU with ~40 GB (see the README); on a smaller one use --init_from=gpt2 (124M).

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-gpt2-xl'

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2; 'gpt2', 'gpt2-medium', 'gpt2-large' also work
always_save_checkpoint = False  # only save when val improves: it overfits 302k tokens quickly

# 1 sequence x 1024 tokens x 32 micro-steps = 32,768 tokens per step; 20 steps are ~2 epochs
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# a pretrained model needs only a nudge: a small constant learning rate
learning_rate = 3e-5
decay_lr = False
