r"""
Talk to a chat model in the terminal: a checkpoint finetuned on conversations (docs/chat.md), whose
vocabulary carries the chat format of chat_format.py.

    python chat.py --out_dir=out-sft-chat-cpu
    python chat.py --out_dir=out-sft-gpt2 --system="You are a helpful assistant." --temperature=0.7
    echo "What is the secret word for red?" | python chat.py --out_dir=out-sft-chat-cpu

Type a message and press Enter: the reply is printed as it is generated. The conversation is the
model's prompt for each reply; once it outgrows the model's context, its oldest messages are left
out, whole (a system message stays). /clear starts a new conversation; Ctrl-D (end of input) quits.
"""

import os
import sys
from dataclasses import dataclass

import torch

from configurator import cli
from nanogpt.chat_format import has_chat_format, prompt, stop_token
from nanogpt.checkpoint import load_model
from nanogpt.device import resolve_decode_compile, setup
from nanogpt.errors import UserError
from nanogpt.generation import check_sampling, compile_decode, generate_stream


@dataclass
class ChatConfig:
    out_dir: str = 'out'  # the finetuning run's folder
    ckpt: str = 'best.pt'  # which one in out_dir: best.pt (lowest val loss) or ckpt.pt (latest)
    system: str = ''  # a system message that opens every conversation ('' for none)
    max_new_tokens: int = 256  # the longest reply, in tokens
    temperature: float = 0.7  # 0: greedy, the same reply every time
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 1337  # reply n of a conversation draws from a random stream seeded with seed + n
    device: str = 'auto'
    dtype: str = 'auto'  # 'auto': bf16 where decoding is faster in it, else float32
    # compile the decode step once for the session (generation.compile_decode: tens of seconds on a
    # CPU before the first reply, then ~2x the tokens/s); 'auto': when max_new_tokens is
    # device.COMPILE_MIN_STEPS or more
    compile: bool | str = 'auto'


def reply(model, tokenizer, ids, cfg, seed, device, out=None, step=None):
    """Generate the assistant's message that the prompt ids ask for, printing it as it comes;
    returns it. step: a compiled decode step (generation.compile_decode) or None."""
    out = out or sys.stdout  # looked up now: whatever sys.stdout is when the reply is printed
    x = torch.tensor([ids], device=device)  # (1, T)
    end, new, printed = stop_token(tokenizer), [], 0
    for token in generate_stream(model, x, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                 cfg.top_p, stop=end, seeds=torch.tensor([seed], device=device),
                                 step=step):
        if token.item() == end:
            break
        new.append(token.item())
        text = tokenizer.decode(new).rstrip('\ufffd')  # a character a BPE token left unfinished
        out.write(text[printed:])
        out.flush()
        printed = len(text)
    text = tokenizer.decode(new)
    out.write(text[printed:] + '\n')
    return text


def check_config(cfg):
    check_sampling(cfg)


def main(cfg):
    check_config(cfg)
    dev = setup(cfg.device, cfg.dtype, sample_rows=1)
    model, tokenizer, _ = load_model('resume', cfg.out_dir, cfg.ckpt)
    if not has_chat_format(tokenizer):
        raise UserError(f"{os.path.join(cfg.out_dir, cfg.ckpt)} has no chat format (a base "
                        "model?): finetune it on conversations first, see docs/chat.md")
    model.to(dev.device)
    step = None  # the eager decode step
    if resolve_decode_compile(cfg.compile, dev.device, cfg.max_new_tokens):
        print("the decode step compiles during the first reply (once per session: tens of seconds "
              "on a CPU)", file=sys.stderr, flush=True)
        step = compile_decode(model, dev.type)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    opening = [{'role': 'system', 'content': cfg.system}] if cfg.system else []
    messages, n = list(opening), 0
    print("type a message; /clear starts over, Ctrl-D quits")
    while True:
        try:
            line = input('> ')
        except EOFError:
            print()
            return messages
        if line.strip() == '/clear':
            messages = list(opening)
            print('(a new conversation)')
            continue
        if not line.strip():
            continue
        messages.append({'role': 'user', 'content': line})
        try:
            ids = prompt(tokenizer, messages, model.config.block_size)  # the latest turns
        except UserError as e:  # characters a character-level model has no tokens for
            print(f"error: {e}")
            messages.pop()
            continue
        with torch.no_grad(), dev.autocast:
            text = reply(model, tokenizer, ids, cfg, cfg.seed + n, dev.device, step=step)
        messages.append({'role': 'assistant', 'content': text})
        n += 1


if __name__ == '__main__':
    cli(main, ChatConfig)
