# The speedrun: character-level tiny Shakespeare to val loss 1.89 as fast as 2 CPU cores allow.
# python data/shakespeare_char/prepare.py && python train.py config/speedrun_shakespeare_char_cpu.py
# The CPU recipe's shape with the modern parts of modded-nanogpt and nanochat (see README, "Speed").

out_dir = 'out-shakespeare-char-speedrun'
eval_interval = 250  # evaluations cost time too: once, at the end
eval_at_start = False
eval_iters = 100  # 100 batches per split: the 1.89 line is decided by the model, not by eval noise
log_interval = 50
always_save_checkpoint = False

dataset = 'shakespeare_char'
device = 'cpu'
compile = False
gradient_accumulation_steps = 1
batch_size = 24  # bigger matmuls use the cores better than 12 rows
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
rotary = True
rmsnorm = True
qk_norm = True
relu2 = True
tie_weights = False

optimizer = 'muon'  # Muon for the blocks' matrices, AdamW for embeddings, head and gains
muon_lr = 0.02
learning_rate = 3e-3  # AdamW's peak, for embeddings, head and gains
max_iters = 250  # 384k tokens: val <= 1.89 at the end (the cosine decay does much of the work)
lr_decay_iters = 250
min_lr = 3e-4
beta2 = 0.99
warmup_iters = 20
weight_decay = 0.0
