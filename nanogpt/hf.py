"""
OpenAI's GPT-2 in, Hugging Face GPT-2 folders out: the weights of transformers' GPT2LMHeadModel
mapped onto model.GPT and back.
"""

import json
import math
import os

import torch

from model import GPT, MODERN_SWITCHES, GPTConfig
from nanogpt.chat_format import END
from nanogpt.errors import UserError
from nanogpt.tokenizer import bytes_to_unicode

# OpenAI's released GPT-2 checkpoints, as named on the Hugging Face hub (n_layer, n_head, n_embd):
# 124M (12, 12, 768), 350M (24, 16, 1024), 774M (36, 20, 1280), 1558M (48, 25, 1600)
GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
# GPT-2 stores these matrices as Conv1D weights of shape (in, out):
# the transpose of nn.Linear's (out, in)
HF_TRANSPOSED = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def in_hf_cache(name):
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(name, 'config.json'), str)


def reachable(url, timeout=5.0):
    import requests
    try:
        requests.head(url, timeout=timeout)
    except requests.RequestException:
        return False
    return True


def from_pretrained(name_or_path, dropout=None):
    """OpenAI's GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl': downloaded by transformers)
    or a local Hugging Face GPT-2 folder, as a GPT in fp32 on the CPU. The shape is the checkpoint's
    (with biases, as GPT-2); only dropout may be overridden (default 0)."""
    if name_or_path not in GPT2_NAMES and not os.path.isdir(name_or_path):
        raise UserError(f"{name_or_path!r} is neither one of {', '.join(GPT2_NAMES)} nor a folder "
                        "holding a Hugging Face GPT-2 (config.json + weights)")
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UserError("loading GPT-2 needs Hugging Face transformers: "
                        "pip install -e .[hf]") from None
    if name_or_path in GPT2_NAMES and not in_hf_cache(name_or_path):
        # transformers would retry for about a minute before its own error
        endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
        if not reachable(endpoint):
            raise UserError(f"{name_or_path!r} is downloaded from {endpoint}, which cannot be "
                            "reached (no network?): connect, or pass a local Hugging Face GPT-2 "
                            "folder (config.json + weights)")
    try:
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # no network, no such folder content, a foreign config.json
        raise UserError(f"cannot load GPT-2 from {name_or_path!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    c = hf.config
    # Our blocks compute GPT-2's function only with GPT-2's choices: the tanh GELU, LayerNorm eps
    # 1e-5, a 4x wide MLP, attention scaled by 1/sqrt(hs) and the head tied to the token embedding.
    if (c.activation_function not in ('gelu_new', 'gelu_pytorch_tanh')
            or c.layer_norm_epsilon != 1e-5 or c.n_inner not in (None, 4 * c.n_embd)
            or not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx
            or not c.tie_word_embeddings):
        raise UserError(f"{name_or_path} is a GPT-2 variant this model does not compute "
                        f"(activation {c.activation_function}, eps {c.layer_norm_epsilon}, "
                        f"n_inner {c.n_inner}, tied head {c.tie_word_embeddings})")
    config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                       n_head=c.n_head, n_embd=c.n_embd, bias=True, dropout=dropout or 0.0)
    with torch.device('meta'):  # shapes only: no memory, no random init of weights to be replaced
        sd = GPT(config).state_dict()
    # older transformers also keep each layer's causal mask as buffers: not weights
    sd_hf = {k: v.t() if k.endswith(HF_TRANSPOSED) else v for k, v in hf.state_dict().items()
             if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
    if sd.keys() != sd_hf.keys() or any(v.shape != sd[k].shape for k, v in sd_hf.items()):
        raise UserError(f"{name_or_path}: weights {sorted(sd_hf.keys() ^ sd.keys())[:4]} "
                        "do not fit GPT-2")
    return GPT.from_state_dict(config, {k: v.contiguous() for k, v in sd_hf.items()})


def export_hf(model, folder, tokenizer=None):
    """Write a model as a Hugging Face GPT-2 folder (config.json + model.safetensors) that
    transformers.GPT2LMHeadModel.from_pretrained loads: the inverse of from_pretrained. A model
    without biases gets zero biases, which compute the same function. With a tokenizer
    (tokenizer.Tokenizer) its files are written too, so the folder is all transformers needs, and
    its end-of-text token (50256 in GPT-2's BPE; none in a character vocabulary) is the eos, or for
    a chat model its <|end|> (chat_format.py)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("exporting to Hugging Face needs safetensors: "
                        "pip install -e .[hf]") from None
    c = model.config
    eos_token_id = tokenizer.eot_token if tokenizer is not None else None
    if tokenizer is not None and END in tokenizer.special:  # a chat model ends its turn there
        eos_token_id = tokenizer.special[END]
    if not c.is_gpt2():
        raise UserError("only GPT-2's architecture exports to a Hugging Face GPT-2 folder: "
                        f"this model has one of {', '.join(MODERN_SWITCHES)} "
                        "changed from its default")
    sd = model.state_dict()
    tensors = {}
    for k, v in sd.items():
        if k == 'lm_head.weight':
            continue  # the same tensor as wte; transformers ties it back on load
        tensors[k] = (v.t() if k.endswith(HF_TRANSPOSED) else v).detach().cpu().contiguous()
        bias = k[:-len('weight')] + 'bias'
        if k.endswith('.weight') and 'wte' not in k and 'wpe' not in k and bias not in sd:
            # Linear (out, in) and LayerNorm (n,): out biases
            tensors[bias] = torch.zeros(v.shape[0])
    hf_config = {
        'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': c.vocab_size,
        'n_positions': c.block_size, 'n_layer': c.n_layer, 'n_head': c.n_head, 'n_embd': c.n_embd,
        'n_inner': None, 'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5,
        'resid_pdrop': c.dropout, 'embd_pdrop': c.dropout, 'attn_pdrop': c.dropout,
        'initializer_range': 0.02, 'tie_word_embeddings': True,
        'bos_token_id': eos_token_id, 'eos_token_id': eos_token_id}
    if tokenizer is not None:
        write_tokenizer(tokenizer, folder, c.block_size)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(hf_config, f, indent=2)
    save_file(tensors, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})


# --------------------------------------------------------------------------------------------------
# tokenizer files, so that an exported folder is all transformers (and lm-evaluation-harness) need

def bpe_merges(ranks):
    """The merges of a byte-level BPE, in order, recovered from its token ranks (tiktoken keeps
    only those): a token of rank r was made by the merge that BPE with the merges below r leaves
    as the last one, i.e. applying merges of rank < r to its bytes ends in exactly two parts."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, math.inf) for a, b in zip(parts[:-1], parts[1:])]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def write_tokenizer(tokenizer, folder, block_size):
    """The tokenizer files of a vocabulary (tokenizer.Tokenizer), read by transformers'
    AutoTokenizer: GPT-2's vocab.json + merges.txt made from tiktoken's ranks; for a BPE trained
    here a tokenizer.json of the same kind (its split pattern, then bytes, then merges), as
    Llama 3's; for a character vocabulary a tokenizer.json mapping each character to its id (no
    normalisation, no spaces added or removed on decode). All encode and decode exactly as
    `tokenizer` does."""
    os.makedirs(folder, exist_ok=True)
    if tokenizer.spec['kind'] == 'tiktoken':
        if tokenizer.spec['encoding'] != 'r50k_base':
            raise UserError(f"only GPT-2's BPE (r50k_base) exports as tokenizer files, "
                            f"not {tokenizer.spec['encoding']}")
        ranks = tokenizer.enc._mergeable_ranks  # bytes -> id, the BPE's whole vocabulary
        b2u = bytes_to_unicode()
        text = lambda b: ''.join(b2u[x] for x in b)  # noqa: E731
        vocab = ({text(b): i for b, i in ranks.items()} | {'<|endoftext|>': tokenizer.eot_token}
                 | tokenizer.special)
        with open(os.path.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
            f.write('#version: 0.2\n')
            f.writelines(f'{text(a)} {text(b)}\n' for a, b in bpe_merges(ranks))
        config = {'tokenizer_class': 'GPT2Tokenizer', 'bos_token': '<|endoftext|>',
                  'eos_token': '<|endoftext|>', 'unk_token': '<|endoftext|>',
                  'add_prefix_space': False}
    elif tokenizer.spec['kind'] == 'bpe':
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        ranks = tokenizer.enc._mergeable_ranks
        b2u = bytes_to_unicode()
        text = lambda b: ''.join(b2u[x] for x in b)  # noqa: E731
        # ignore_merges: a piece that is a token is that token, as in tiktoken (which looks a piece
        # up whole before merging its bytes)
        tok = HFTokenizer(models.BPE({text(b): i for b, i in ranks.items()},
                                     [(text(a), text(b)) for a, b in bpe_merges(ranks)],
                                     ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(tokenizer.spec['pattern']), behavior='isolated'),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        # ids len(ranks).. in order, as ours: <|endoftext|>, then e.g. the chat format's
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                for s in ['<|endoftext|>', *tokenizer.special]])
        tok.save(os.path.join(folder, 'tokenizer.json'))
        config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|endoftext|>',
                  'eos_token': '<|endoftext|>'}
    else:
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        tok = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(tokenizer.chars)}))
        # every character its own piece, newlines and spaces included; decode joins them as they are
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(list(tokenizer.special))  # ids len(chars).., as ours
        tok.save(os.path.join(folder, 'tokenizer.json'))
        config = {'tokenizer_class': 'PreTrainedTokenizerFast'}
    # model_max_length: the model's context, which lm-evaluation-harness and pipelines respect
    config |= {'model_max_length': block_size, 'clean_up_tokenization_spaces': False}
    if tokenizer.special:  # e.g. the chat format's: each read as its one token, never as text
        config['additional_special_tokens'] = list(tokenizer.special)
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump(config, f, indent=2)
