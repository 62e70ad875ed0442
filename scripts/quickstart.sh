#!/usr/bin/env bash
# The CPU quick start in one command on a fresh machine: install the core, prepare tiny
# Shakespeare, train the 4x128 character model (about 2 minutes on 2 CPU cores), sample from it.
#
#   bash scripts/quickstart.sh                  # downloads tiny Shakespeare (1.1 MB)
#   bash scripts/quickstart.sh --input FILE     # offline: any local copy of input.txt
#   TRAIN_FLAGS="--max_iters=200" bash scripts/quickstart.sh   # flags for train.py (SAMPLE_FLAGS too)
#
# It installs into the Python it finds (PYTHON, else python): make a venv first if you want one,
# and install the PyTorch build for your machine first (https://pytorch.org); without torch it
# runs `pip install torch`. Rerunning it starts the run in out-shakespeare-char-cpu over.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install torch
"$PY" -m pip install -r requirements.txt
"$PY" data/shakespeare_char/prepare.py "$@"
# shellcheck disable=SC2086  # the flags are meant to split
"$PY" train.py config/train_shakespeare_char_cpu.py --overwrite=True ${TRAIN_FLAGS:-}
# shellcheck disable=SC2086
"$PY" sample.py --out_dir=out-shakespeare-char-cpu ${SAMPLE_FLAGS:-}
