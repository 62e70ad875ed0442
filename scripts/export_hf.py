r"""
Export a checkpoint to a self-contained Hugging Face GPT-2 folder (config.json, model.safetensors
and the tokenizer's files), so a model trained here runs in transformers, its pipelines,
lm-evaluation-harness and the rest of that ecosystem, with no network.

    python scripts/export_hf.py --out_dir=out-shakespeare --hf_dir=hf-shakespeare
    python -c "from transformers import pipeline; \
        generate = pipeline('text-generation', model='hf-shakespeare'); \
        print(generate('ROMEO:', max_new_tokens=50)[0]['generated_text'])"

Needs `pip install -e .[hf]` (safetensors; transformers, with tokenizers, to load the result).
A GPT-2 BPE model gets GPT-2's vocab.json and merges.txt, made offline from tiktoken's vocabulary; a
character-level one a tokenizer.json with one token per character. Both encode and decode exactly
as our tokenizer does (tests/test_benchmarks.py checks it on all of tiny Shakespeare).
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import cli
from nanogpt.checkpoint import load_model
from nanogpt.errors import UserError
from nanogpt.hf import export_hf


@dataclass
class ExportConfig:
    out_dir: str = 'out'  # the training run's folder
    ckpt: str = 'best.pt'  # which one in out_dir: best.pt (lowest val loss) or ckpt.pt (latest)
    hf_dir: str = ''  # where to write the Hugging Face folder; '' = out_dir/hf
    overwrite: bool = False  # replace the files of a folder that is not empty (an older export)


def folder(cfg):
    return cfg.hf_dir or os.path.join(cfg.out_dir, 'hf')


def check_config(cfg):
    """Refuse a folder that is not empty, as train.py refuses an out_dir holding a run."""
    hf_dir = folder(cfg)
    if os.path.isdir(hf_dir) and os.listdir(hf_dir) and not cfg.overwrite:
        raise UserError(f"{hf_dir} is not empty (an earlier export?): give another --hf_dir, or "
                        "replace its files with --overwrite=True")


def main(cfg):
    check_config(cfg)
    hf_dir = folder(cfg)
    model, tokenizer, ckpt = load_model('resume', cfg.out_dir, cfg.ckpt)
    # recorded in config.json, as trained
    model.config.dropout = ckpt['model_args'].get('dropout', 0.0)
    try:
        export_hf(model, hf_dir, tokenizer)
    except OSError as e:  # a folder that cannot be made or written, a full disk
        raise UserError(f"could not write {hf_dir} ({e.strerror or e}): give --hf_dir a "
                        "folder you can write") from None
    print(f"wrote {hf_dir}: {model.get_num_params(non_embedding=False) / 1e6:.2f}M parameters, "
          f"vocabulary {ckpt['vocab']['kind']}; "
          f"load it with transformers' pipeline('text-generation', model='{hf_dir}')")
    return hf_dir


if __name__ == '__main__':
    cli(main, ExportConfig)
