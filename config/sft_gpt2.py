# Supervised finetuning (SFT) of OpenAI's GPT-2 (124M) into a chat model, on databricks-dolly-15k's
# human-written instructions and responses, in the chat format (docs/chat.md). One GPU.
#   python data/chat/prepare.py          # downloads dolly-15k (~13 MB) -> data/chat, GPT-2's BPE
#   python train.py config/sft_gpt2.py
#   python chat.py --out_dir=out-sft-gpt2
# gpt2-medium (355M) works the same with --init_from=gpt2-medium (more memory: halve batch_size and
# double gradient_accumulation_steps on a 24 GB GPU).

out_dir = 'out-sft-gpt2'
init_from = 'gpt2'  # grows 4 rows for the chat tokens, padded to 50304 (checkpoint.grow_vocab)
dataset = 'chat'
eval_interval = 50
eval_iters = 40  # the val split's assistant tokens only: the loss of the replies
log_interval = 10
always_save_checkpoint = False  # only a better val loss replaces best.pt: SFT overfits quickly
wandb_log = False
wandb_project = 'sft'
wandb_run_name = 'sft-gpt2'

# 8 x 1024 tokens x 4 micro-steps = 32,768 tokens per step (the assistant's part of them is what
# the loss counts)
batch_size = 8
block_size = 1024
gradient_accumulation_steps = 4
dropout = 0.1  # finetuning on a few million tokens: some regularisation

# a pretrained model needs a nudge, not a new start; warm-up protects it from the new rows' first
# gradients
learning_rate = 5e-5
max_iters = 600
warmup_iters = 50
lr_decay_iters = 600
min_lr = 5e-6
weight_decay = 0.0  # few steps: decaying toward zero would only pull it away from GPT-2
