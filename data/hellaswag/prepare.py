"""
HellaSwag (Zellers et al. 2019), the validation set: 10,042 items, a context and four endings of
which one is what really followed, from ActivityNet captions and WikiHow.

    python data/hellaswag/prepare.py                 # downloads the official file beside this one
    python data/hellaswag/prepare.py --input FILE    # a local copy of hellaswag_val.jsonl, offline
    python data/hellaswag/prepare.py --out FILE      # write the items elsewhere

Writes val.jsonl in the multiple-choice format eval.py reads (multiple_choice.py: context, endings,
label; the official fields are kept too), with lm-evaluation-harness's preprocessing of its
`hellaswag` task, so that the figures compare with the ones it reports:
    context = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    endings = [preprocess(e) for e in endings]
where preprocess strips, turns WikiHow's " [title]" into ". ", drops other [bracketed] markup and
turns double spaces into single ones (it strips first, so a WikiHow ending that began with "[step]"
keeps a leading space, scored as it is there). build-nanogpt and llm.c score the raw `ctx` instead
and normalise per token: their 0.2955 for GPT-2 124M is not the same metric as lm-eval's 0.3114.
"""

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanogpt.prepare import download, read_jsonl  # noqa: E402

URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'
HERE = os.path.dirname(os.path.abspath(__file__))
N_ITEMS = 10042  # in the official validation file


def preprocess(text):
    """lm-evaluation-harness's tasks/hellaswag/utils.py, unchanged."""
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of the WikiHow part
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def convert(doc):
    """One official HellaSwag item as one of ours."""
    ctx = doc['ctx_a'] + " " + doc['ctx_b'].capitalize()
    return {'context': preprocess(doc['activity_label'] + ": " + ctx),
            'endings': [preprocess(e) for e in doc['endings']], 'label': int(doc['label']),
            **{k: doc[k] for k in ('ind', 'activity_label', 'source_id', 'split_type')
               if k in doc}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--input', help='the official hellaswag_val.jsonl (default: downloaded '
                                        'beside this file if missing)')
    parser.add_argument('--out', default=os.path.join(HERE, 'val.jsonl'),
                        help='where to write the items (default: val.jsonl here)')
    args = parser.parse_args()
    path = args.input or os.path.join(HERE, 'hellaswag_val.jsonl')
    if args.input is None and not os.path.isfile(path):
        download(URL, path)
    items = [convert(doc) for _, doc in read_jsonl(path)]
    tmp = args.out + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + '\n' for item in items)
    os.replace(tmp, args.out)
    note = '' if len(items) == N_ITEMS else f" (the official validation set has {N_ITEMS:,})"
    print(f"{len(items):,} items{note} written to {args.out}")


if __name__ == '__main__':
    from configurator import cli
    cli(main)
