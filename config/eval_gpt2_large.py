# Val loss of OpenAI's gpt2-large (774M: 36 layers, 20 heads, 1280 wide) on OpenWebText,
# without training.
# python data/openwebtext/prepare.py && python train.py config/eval_gpt2_large.py

init_from = 'gpt2-large'
dataset = 'openwebtext'
eval_only = True
batch_size = 8
eval_iters = 500  # 500 x 8 x 1024 = 4.1M tokens per split, for a low-noise estimate
wandb_log = False
