# Supervised finetuning (SFT) on a CPU: the quick start's character-level Shakespeare model
# learns to answer in the chat format, by a made-up rule (data/chat/secret_words.py); docs/chat.md.
#   python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char_cpu.py
#   python data/chat/secret_words.py
#   python data/chat/prepare.py --input data/chat/secret_words.jsonl \
#       --vocab_of out-shakespeare-char-cpu --out_dir data/secret_words --val_fraction 0.2
#   python train.py config/sft_chat_cpu.py
#   python chat.py --out_dir=out-sft-chat-cpu

out_dir = 'out-sft-chat-cpu'
init_from = 'out-shakespeare-char-cpu'  # its best.pt: the shape and weights come from there
dataset = 'secret_words'
eval_interval = 50
eval_iters = 20  # of the held-out pairs' conversations: their assistant tokens only
log_interval = 10
always_save_checkpoint = False

device = 'cpu'
compile = False
gradient_accumulation_steps = 1
batch_size = 16
block_size = 64  # the base model's context: at most what it has positions for

dropout = 0.0
learning_rate = 1e-3
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
min_lr = 1e-4
beta2 = 0.99
