# A laptop recipe: a tiny GPT on character-level tiny Shakespeare, a few minutes on 2 CPU cores.
# python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char_cpu.py

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 250
eval_iters = 20  # 20 batches x 12 x 64 = 15k characters per split: enough to rank checkpoints
log_interval = 50
always_save_checkpoint = False

dataset = 'shakespeare_char'
device = 'cpu'
compile = False  # compiling takes longer than it saves for a model this small
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

# 4 layers, 4 heads, 128 wide (~0.8M parameters)
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # too small to overfit in 2000 steps

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
