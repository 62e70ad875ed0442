#!/usr/bin/env bash
# Set up and run the tests in one command on a fresh machine: the project with everything the
# tests use (pip install -e .[dev]), the linter, then the suite. CI runs exactly this (.ci/run).
#
#   bash scripts/test.sh                  # the whole suite (about 4 minutes on 2 CPU cores)
#   bash scripts/test.sh -m "not slow"    # the fast part (under a minute); any pytest flags
#
# Test data: ../shared/data beside the checkout if there (NANOGPT_SHARED_DATA points elsewhere),
# else what the prepare scripts download; GPT-2's BPE from TIKTOKEN_CACHE_DIR or tiktoken's cache.
# As root with apt-get, it installs Chromium for the playground's browser test (else that skips).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install torch
"$PY" -m pip install -q -e ".[dev]"
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
      chromium-driver; } >/dev/null 2>&1 || echo "could not install chromium: the browser test will skip"
fi
"$PY" -m ruff check .
"$PY" -m pytest -q tests "$@"
