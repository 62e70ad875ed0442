# The quick start's model and recipe on tiny Shakespeare in a BPE of its own (2048 tokens, ~3.1
# bytes each): val 2.29 bits per byte after 2000 steps, against 2.70 for characters, at 1.5x the
# step time (docs/tokenizers.md).
# python data/shakespeare_bpe/prepare.py && python train.py config/train_shakespeare_bpe_cpu.py

out_dir = 'out-shakespeare-bpe-cpu'
eval_interval = 250
eval_iters = 20  # 20 batches x 12 x 64 = 15k tokens (~48k characters) per split
log_interval = 50
always_save_checkpoint = False

dataset = 'shakespeare_bpe'
device = 'cpu'
compile = False  # compiling takes longer than it saves for a model this small
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64  # 64 tokens: ~200 characters of context, three times the character model's

# 4 layers, 4 heads, 128 wide: 0.8M parameters in the blocks, 0.26M in the 2048 x 128 embedding
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
