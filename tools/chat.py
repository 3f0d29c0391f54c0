#!/usr/bin/env python
"""Interactive multi-turn chat in the terminal, streaming the reply as it is generated.

    python tools/chat.py --load CKPT|HFDIR [--system TEXT] [--temperature 0.7 --top-p 0.9] [--max-new-tokens N]

Commands at the prompt: /clear forgets the conversation, /exit (or Ctrl-D) quits.
"""
import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import exit_on_user_error  # noqa: E402
from megatron_lite.inference.cli import (add_model_args, add_sampling_args, load_for_inference,  # noqa: E402
                                         sampling_params)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    add_sampling_args(ap, max_new_tokens=256, temperature=0.7)
    ap.add_argument("--system", default=None, help="system prompt placed before the conversation")
    ap.add_argument("--context-limit", type=int, default=None,
                    help="tokens of history kept in the prompt (default: the model's max_seq_len)")
    args = ap.parse_args(argv)
    with exit_on_user_error("chat"):
        from megatron_lite.inference.chat import stream_chat

        params = sampling_params(args)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import; keep stdout clean
            model, tokenizer = load_for_inference(args)
        history = [{"role": "system", "content": args.system}] if args.system else []
        print("megatron_lite chat — /clear to reset, /exit or Ctrl-D to quit", file=sys.stderr)
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            if line.strip() in ("/exit", "/quit"):
                return
            if line.strip() == "/clear":
                history = history[:1] if args.system else []
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            print("assistant> ", end="", flush=True)
            reply = ""
            try:
                for event in stream_chat(history, tokenizer, model, params, context_limit=args.context_limit):
                    reply += event.text
                    print(event.text, end="", flush=True)
            except KeyboardInterrupt:  # stop this reply, keep the session
                pass
            print()
            history.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    main()
