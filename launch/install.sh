#!/usr/bin/env bash
# Install megatron_lite into ./.venv (created if no virtualenv is active). Sourced by quickstart.sh and
# tests/run_tests.sh so a fresh machine needs nothing but python3.
# The CPU torch build is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
# On a GPU machine, install your CUDA torch first (and `pip install -e ".[gpu]"` for flash-attn).
set -euo pipefail
EXTRAS="${1:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x "$ROOT/.venv/bin/python" ] || python3 -m venv "$ROOT/.venv"
  # shellcheck disable=SC1091
  source "$ROOT/.venv/bin/activate"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==2.13.0" 2> >(grep -v "is ignored: it is neither" >&2)
fi
# (the grep hides this machine's harmless warnings about a missing local package mirror)
pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}" 2> >(grep -v "is ignored: it is neither" >&2)
python -c "import megatron_lite, torch, deepspeed; print(f'megatron_lite ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | grep -v "real_accelerator"
