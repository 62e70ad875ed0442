r"""
Sample text from a trained model. Needs nothing but the checkpoint (it carries its vocabulary), or
OpenAI's GPT-2 itself.

    python sample.py --out_dir=out-shakespeare-char --num_samples=1  # streams the text as it comes
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 \
        --max_new_tokens=200
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --stop=JULIET: \
        --device=cpu
    python sample.py --out_dir=out-sft-chat-cpu --start="What is the secret word for pink?"
(the last: a chat model, docs/chat.md: --start is the user's message, a sample the reply)

One sample is printed as it is generated; several are generated together as one batch and printed at
the end. Sample i draws from its own random stream, seeded with seed + i, so it is the same
text whatever num_samples is. The last line gives the speed in tokens/s.
"""

import os
import sys
import time
from dataclasses import dataclass

import torch

from configurator import cli
from nanogpt import chat_format
from nanogpt.checkpoint import load_model
from nanogpt.device import resolve_decode_compile, setup
from nanogpt.errors import UserError
from nanogpt.generation import check_keep, check_sampling, compile_decode, generate_stream
from nanogpt.quantize import quantize_int8


@dataclass
class SampleConfig:
    # 'resume' (out_dir/ckpt), or OpenAI's 'gpt2' ... 'gpt2-xl' or a local HF GPT-2 folder
    init_from: str = 'resume'
    out_dir: str = 'out'  # the training run's folder
    ckpt: str = 'best.pt'  # which one in out_dir: best.pt (lowest val loss) or ckpt.pt (latest)
    start: str = '\n'  # the prompt, or FILE:path to read it from a file
    num_samples: int = 10  # 1 streams the text to the terminal; more are sampled as one batch
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0: the model's distribution; lower: more conservative; 0: greedy
    top_k: int | None = 200  # sample only among the k most likely tokens; None for all
    top_p: float | None = None  # sample only among the top tokens holding this much probability
    # end a sample at the first occurrence of this text after the prompt (kept in the sample)
    stop: str = ''
    # a chat model (docs/chat.md): start is a user's message and a sample the assistant's reply, up
    # to its <|end|>; 'auto': when the checkpoint has the chat format
    chat: bool | str = 'auto'
    # False re-runs the whole context for every token: the classic loop, much slower
    # (measured in docs/sampling.md)
    use_cache: bool = True
    keep: int | None = None  # tokens of context kept when the cache fills up; None: block_size // 2
    seed: int = 1337  # sample i draws from a random stream seeded with seed + i
    device: str = 'auto'
    # 'auto': bf16 where decoding is faster in it (device.resolve_sample_dtype), else float32
    dtype: str = 'auto'
    # compile the decode step (generation.compile_decode: 1.4-2.7x the tokens/s at 1 row, after
    # 20-45 s of compiling on a CPU); 'auto': from device.COMPILE_MIN_STEPS (20,000) new tokens on
    compile: bool | str = 'auto'
    # weight-only int8 Linears (nanogpt/quantize.py), CPU only: a quarter of fp32's bytes a step;
    # the fastest at a few rows, compiled, but greedy text drifts from fp32's (docs/sampling.md)
    int8: bool = False


def cut_at_stop(text, stop):
    """text up to and including the first occurrence of stop; all of it if stop is '' or absent."""
    i = text.find(stop) if stop else -1
    return text if i < 0 else text[:i + len(stop)]


def check_config(cfg):
    check_sampling(cfg)
    if cfg.chat not in (True, False, 'auto'):
        raise UserError(f"chat must be True, False or 'auto', got {cfg.chat!r}")


def main(cfg):
    check_config(cfg)
    dev = setup(cfg.device, cfg.dtype, sample_rows=cfg.num_samples)
    device, dtype = dev.device, dev.dtype
    model, tokenizer, _ = load_model(cfg.init_from, cfg.out_dir, cfg.ckpt)
    check_keep(cfg.keep, model.config.block_size)
    model.to(device)
    if cfg.int8:
        if dev.type != 'cpu':
            raise UserError(f"int8 is for decoding on a CPU (aten._weight_int8pack_mm); on "
                            f"{device} use --int8=False")
        model = quantize_int8(model)
    decode = None  # the eager decode step
    if cfg.use_cache and resolve_decode_compile(cfg.compile, device, cfg.max_new_tokens,
                                                cfg.num_samples):
        print("compiling the decode step (once per run: tens of seconds on a CPU)...",
              file=sys.stderr, flush=True)
        decode = compile_decode(model, dev.type)

    start = cfg.start
    if start.startswith('FILE:'):
        path = start[5:]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} not found")
        try:
            with open(path, encoding='utf-8') as f:
                start = f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"prompt file {path} is not UTF-8 text (byte {e.start}): convert it, "
                            "e.g. iconv -f latin1 -t utf-8") from None
    stop, stop_token = cfg.stop, None
    has_chat = chat_format.has_chat_format(tokenizer)
    if cfg.chat is True and not has_chat:
        raise UserError("chat=True needs a model finetuned on conversations (docs/chat.md); "
                        "this checkpoint has no chat format")
    if cfg.chat is True or cfg.chat == 'auto' and has_chat:
        ids = chat_format.prompt(tokenizer, [{'role': 'user', 'content': start}])
        start, stop = tokenizer.decode(ids), chat_format.END
        stop_token = chat_format.stop_token(tokenizer)
    else:
        ids = tokenizer.encode(start)
    if not ids:
        raise UserError("the prompt is empty: give --start some text the model knows")
    B = cfg.num_samples
    # (B, T): one row per sample
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...].repeat(B, 1)
    seeds = torch.arange(cfg.seed, cfg.seed + B, device=device)  # one random stream per sample

    streaming = B == 1
    new = [[] for _ in range(B)]  # the token ids sampled so far, per sample, once read
    pending = []  # steps not read yet: reading waits for the device, so only for text shown
    printed = 0  # characters of the streamed sample already on the terminal
    if streaming:
        print(start, end='', flush=True)
    t0 = time.perf_counter()
    # bf16 by autocast rather than model.to(torch.bfloat16): the prefills run on the fp32 weights
    # off GPUs (generate_stream turns autocast off for them), autocast casts each weight to bf16
    # once for the whole `with` block, not at every token, and LayerNorm, softmax and the residual
    # stream stay in fp32.
    with torch.no_grad(), dev.autocast:
        for step in generate_stream(model, x, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                    cfg.top_p, stop=stop_token, use_cache=cfg.use_cache,
                                    keep=cfg.keep, seeds=seeds, step=decode):
            pending.append(step)
            if not (streaming or stop):
                continue
            for row, tokens in zip(new, torch.stack(pending, dim=1).tolist()):
                row += tokens
            pending = []
            # decode the whole sample so far:
            # a BPE token may hold only part of a multi-byte character
            texts = [cut_at_stop(tokenizer.decode(row), stop) for row in new]
            if streaming:
                # an unfinished character: print it once it is whole
                shown = texts[0].rstrip('\ufffd')
                print(shown[printed:], end='', flush=True)
                printed = len(shown)
            if stop and all(stop in text for text in texts):
                break
    if pending:
        for row, tokens in zip(new, torch.stack(pending, dim=1).tolist()):
            row += tokens
    dt = time.perf_counter() - t0
    n_tokens = B * len(new[0])

    samples = [start + cut_at_stop(tokenizer.decode(row), stop) for row in new]
    if streaming:
        print(samples[0][len(start) + printed:])
        print('---------------')
    else:
        for s in samples:
            print(s)
            print('---------------')
    print(f"{n_tokens} tokens in {dt:.2f} s: {n_tokens / dt:,.1f} tokens/s on {device} ({dtype}"
          f"{', int8 weights' if cfg.int8 else ''}{', KV cache' if cfg.use_cache else ', no cache'}"
          f"{', compiled decode step (compile time included)' if decode else ''})")
    return samples


if __name__ == '__main__':
    cli(main, SampleConfig)
