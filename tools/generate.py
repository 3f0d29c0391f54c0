#!/usr/bin/env python
"""Complete a prompt with a trained model and print the completion only (nothing else on stdout).

    python tools/generate.py --load CKPT|HFDIR --prompt TEXT --max-new-tokens N [--greedy | --top-k K --top-p P --temperature T]

Add --chat to wrap the prompt in the chat template as one user turn, --stream to print while generating.
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
    ap.add_argument("--prompt", required=True, help="text to complete")
    ap.add_argument("--chat", action="store_true", help="treat --prompt as a user message (chat template)")
    ap.add_argument("--stream", action="store_true", help="print text as it is generated")
    add_sampling_args(ap)
    args = ap.parse_args(argv)
    with exit_on_user_error("generate"):
        from megatron_lite.inference.chat import build_prompt, prompt_budget
        from megatron_lite.inference.generate import stream

        params = sampling_params(args)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import; keep stdout clean
            model, tokenizer = load_for_inference(args)
        prompt = args.prompt
        if args.chat:
            prompt = build_prompt(tokenizer, [{"role": "user", "content": prompt}],
                                  prompt_budget(model, params, None))
        for event in stream(model, tokenizer, prompt, params):
            if args.stream:
                print(event.text, end="", flush=True)
            elif event.completion is not None:
                print(event.completion.text, end="")
        print()


if __name__ == "__main__":
    main()
