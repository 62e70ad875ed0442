# Val loss of OpenAI's gpt2-medium (350M: 24 layers, 16 heads, 1024 wide) on OpenWebText,
# without training.
# python data/openwebtext/prepare.py && python train.py config/eval_gpt2_medium.py

init_from = 'gpt2-medium'
dataset = 'openwebtext'
eval_only = True
batch_size = 8
eval_iters = 500  # 500 x 8 x 1024 = 4.1M tokens per split, for a low-noise estimate
wandb_log = False
