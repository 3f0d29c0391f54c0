#!/usr/bin/env bash
# Install megatron_lite (into ./.venv unless a virtualenv is active) and run the whole pipeline on the
# embedded default corpus: corpus -> tokenizer -> preprocess -> pretrain (deepspeed, 2 ranks, ZeRO-2) -> SFT
# -> eval -> HF export -> sample chats. Flags go to launch/main_job.py (e.g. --moe, --work-dir DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/install.sh"
cd "$ROOT"
python launch/main_job.py "$@"
