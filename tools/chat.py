#!/usr/bin/env python
"""Interactive multi-turn chat in the terminal, streaming the reply as it is generated.

    python tools/chat.py --load CKPT|HFDIR [--system TEXT] [--temperature 0.7 --top-p 0.9] [--max-new-tokens N]

On CPU the decode step is compiled once before the first prompt (a minute or more on 2 cores); --no-compile
starts at once and decodes eagerly.

Commands at the prompt: /clear forgets the conversation, /exit (or Ctrl-D) quits.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import exit_on_user_error  # noqa: E402
from megatron_lite.inference.cli import add_model_args, add_sampling_args, run_chat  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, long_lived=True)
    add_sampling_args(ap, max_new_tokens=256, temperature=0.7)
    ap.add_argument("--system", default=None, help="system prompt placed before the conversation")
    ap.add_argument("--context-limit", type=int, default=None,
                    help="tokens of history kept in the prompt (default: the model's max_seq_len)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    with exit_on_user_error("chat"):
        run_chat(args)


if __name__ == "__main__":
    main()
