#!/usr/bin/env python
"""Complete a prompt with a trained model and print the completion only (nothing else on stdout).

    python tools/generate.py --load CKPT|HFDIR --prompt TEXT --max-new-tokens N [--greedy | --top-k K --top-p P --temperature T]

Add --chat to wrap the prompt in the chat template as one user turn, --stream to print while generating.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import exit_on_user_error  # noqa: E402
from megatron_lite.inference.cli import add_model_args, add_sampling_args, run_generate  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompt", required=True, help="text to complete")
    ap.add_argument("--chat", action="store_true", help="treat --prompt as a user message (chat template)")
    ap.add_argument("--stream", action="store_true", help="print text as it is generated")
    add_sampling_args(ap)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    with exit_on_user_error("generate"):
        run_generate(args)


if __name__ == "__main__":
    main()
