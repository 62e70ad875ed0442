# A baby GPT on tiny Shakespeare, character level, for one GPU (minutes on a modern one).
# python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char.py

out_dir = 'out-shakespeare-char'
eval_interval = 250  # the model overfits this small corpus: check often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # only save when val improves

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

# baby GPT: 6 layers, 6 heads, 384 wide (~10.7M parameters)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small networks can take a higher learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually = max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a bit above 0.95: few tokens per step make noisy gradients
warmup_iters = 100
