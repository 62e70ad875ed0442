r"""
Export a checkpoint to a Hugging Face GPT-2 folder (config.json + model.safetensors), so a model
trained here runs in transformers, its pipelines, lm-evaluation-harness and the rest of that
ecosystem.

    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-shakespeare
    python -c "from transformers import pipeline; \
        generate = pipeline('text-generation', model='hf-shakespeare', tokenizer='gpt2'); \
        print(generate('ROMEO:')[0]['generated_text'])"

Needs `pip install safetensors` (and transformers to load the result). The folder holds no tokenizer
files: for a GPT-2 BPE model use GPT-2's own tokenizer (tokenizer='gpt2'), as above.
"""

import os
from dataclasses import dataclass

from checkpoint import load_model
from configurator import cli
from hf import export_hf


@dataclass
class ExportConfig:
    out_dir: str = 'out'  # the training run's folder
    ckpt: str = 'best.pt'  # which one in out_dir: best.pt (lowest val loss) or ckpt.pt (latest)
    hf_dir: str = ''  # where to write the Hugging Face folder; '' = out_dir/hf


def main(cfg):
    model, tokenizer, ckpt = load_model('resume', cfg.out_dir, cfg.ckpt)
    # recorded in config.json, as trained
    model.config.dropout = ckpt['model_args'].get('dropout', 0.0)
    hf_dir = cfg.hf_dir or os.path.join(cfg.out_dir, 'hf')
    # eos: 50256 for GPT-2's BPE; None for a character vocabulary
    export_hf(model, hf_dir, eos_token_id=tokenizer.eot_token)
    print(f"wrote {hf_dir}: {model.get_num_params(non_embedding=False) / 1e6:.2f}M parameters, "
          f"vocabulary {ckpt['vocab']['kind']}; "
          f"load it with transformers.GPT2LMHeadModel.from_pretrained('{hf_dir}')")
    return hf_dir


if __name__ == '__main__':
    cli(main, ExportConfig)
