"""The command-line front ends of tools/generate.py, tools/chat.py and tools/serve.py: their shared flags and
what each does with its parsed arguments."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from megatron_lite.errors import UserError


def add_sampling_args(ap: argparse.ArgumentParser, max_new_tokens: int = 128, temperature: float = 1.0):
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    ap.add_argument("--greedy", action="store_true", help="always take the most likely token")
    ap.add_argument("--temperature", type=float, default=temperature, help="softmax temperature (0 = greedy)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0 = all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    ap.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    ap.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def add_model_args(ap: argparse.ArgumentParser, long_lived: bool = False):
    """--load/--tag/--device/--dtype and --compile/--no-compile. `long_lived` (chat, server): compiled
    decoding is the default on CPU, paid once at start-up; a one-shot generation defaults to eager, since
    the compile takes longer than it saves on one reply."""
    ap.add_argument("--load", required=True, help="megatron_lite checkpoint folder or HF Llama/Mixtral folder")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: CKPT/latest)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="compute dtype (default float32; use bfloat16 on GPU)")
    what = ("run each decode step as one torch.compile'd graph: about 2x faster decoding on CPU "
            "(benchmarks/results.md), after a one-off compile (a minute or more on a 2-core CPU)")
    if long_lived:
        ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help=f"{what}, done once at start-up with a warm-up before the first request. Default: "
                             "on for --device cpu, off on GPUs (the compiled step is tuned for CPUs); "
                             "--no-compile starts at once and decodes eagerly")
    else:
        ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help=f"{what}. Default off: for one generation the compile costs more than it saves")


def wants_compile(args) -> bool:
    """The --compile choice, with its default resolved: compiled on CPU, eager elsewhere."""
    if args.compile is not None:
        return args.compile
    import torch
    return torch.device(args.device).type == "cpu"


def load_for_inference(args):
    """(model, tokenizer) from the --load/--tag/--device/--dtype/--compile flags of add_model_args; a
    compiled model has its batch-1 step compiled before this returns (a progress line on stderr)."""
    import time

    from megatron_lite.inference.fast_decode import compile_decoder, use_decode_layout
    from megatron_lite.inference.loading import load_model

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import; keep stdout clean
        model, tokenizer = load_model(args.load, args.device, args.dtype, tag=args.tag)
    if not wants_compile(args):
        return use_decode_layout(model), tokenizer
    print("compiling the decode step (once; --no-compile skips it)...", end=" ", file=sys.stderr, flush=True)
    start = time.perf_counter()
    compile_decoder(model).compiled_decoder.warm_up(batch_size=1)
    print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return model, tokenizer


def sampling_params(args):
    from megatron_lite.inference.generate import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, greedy=args.greedy,
                          stop=tuple(args.stop), seed=args.seed).validate()


def run_generate(args):
    """tools/generate.py: print the completion of --prompt (as it is generated with --stream)."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger binds stdout on import: only the text there
        from megatron_lite.inference.chat import build_prompt, prompt_budget
        from megatron_lite.inference.generate import stream

    params = sampling_params(args)
    model, tokenizer = load_for_inference(args)
    prompt = args.prompt
    if args.chat:
        prompt = build_prompt(tokenizer, [{"role": "user", "content": prompt}], prompt_budget(model, params, None))
    for event in stream(model, tokenizer, prompt, params):
        if args.stream:
            print(event.text, end="", flush=True)
        elif event.completion is not None:
            print(event.completion.text, end="")
    print()


def run_chat(args):
    """tools/chat.py: a multi-turn chat at the terminal; /clear forgets the conversation, /exit quits."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger binds stdout on import: replies only there
        from megatron_lite.inference.chat import stream_chat

    params = sampling_params(args)
    model, tokenizer = load_for_inference(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print("megatron_lite chat — /clear to reset, /exit or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/clear":
            history = list(system)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = ""
        try:
            for event in stream_chat(model, tokenizer, history, params, context_limit=args.context_limit):
                reply += event.text
                print(event.text, end="", flush=True)
        except KeyboardInterrupt:  # stop this reply, keep the session
            pass
        print()
        history.append({"role": "assistant", "content": reply})


def run_server(args):
    """tools/serve.py: check the limits flags, load the model and serve it until interrupted."""
    from megatron_lite.inference.server import Limits, serve

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port")
    model, tokenizer = load_for_inference(args)
    limit = args.max_tokens_limit or model.config.max_seq_len
    for flag, v in (("--max-tokens-limit", limit), ("--max-body-bytes", args.max_body_bytes),
                    ("--timeout", args.timeout), ("--max-concurrency", args.max_concurrency),
                    ("--max-prompt-tokens", args.max_prompt_tokens or 1)):
        if v <= 0:
            raise UserError(f"{flag} must be > 0, got {v}")
    limits = Limits(max_tokens=limit, default_max_tokens=min(args.default_max_tokens, limit),
                    max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    queue_timeout_s=args.timeout, max_concurrency=args.max_concurrency)
    name = args.model_name or os.path.basename(os.path.normpath(args.load))
    print(f"serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(model, tokenizer, args.host, args.port, name, limits, args.log_level)
