"""Command-line flags shared by tools/generate.py, tools/chat.py and tools/serve.py."""
from __future__ import annotations

import argparse


def add_sampling_args(ap: argparse.ArgumentParser, max_new_tokens: int = 128, temperature: float = 1.0):
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    ap.add_argument("--greedy", action="store_true", help="always take the most likely token")
    ap.add_argument("--temperature", type=float, default=temperature, help="softmax temperature (0 = greedy)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0 = all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    ap.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    ap.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def add_model_args(ap: argparse.ArgumentParser):
    ap.add_argument("--load", required=True, help="megatron_lite checkpoint folder or HF Llama/Mixtral folder")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: CKPT/latest)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="compute dtype (default float32; use bfloat16 on GPU)")
    ap.add_argument("--compile", action="store_true",
                    help="run each decode step as one torch.compile'd graph: faster steady-state decoding "
                         "(on CPU, batch 1 and 8: tiny 1.6-1.9x the eager path, tiny-moe 1.4-2.1x) "
                         "after a one-off compile per batch size and cache bucket (tens of seconds on CPU)")


def load_for_inference(args):
    """(model, tokenizer) from the --load/--tag/--device/--dtype/--compile flags of add_model_args."""
    from megatron_lite.checkpoint_io import load_model
    from megatron_lite.inference.fast_decode import compile_decoder, use_decode_layout

    model, tokenizer = load_model(args.load, args.device, args.dtype, tag=args.tag)
    return (compile_decoder(model) if args.compile else use_decode_layout(model)), tokenizer


def sampling_params(args):
    from megatron_lite.inference.generate import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, greedy=args.greedy,
                          stop=tuple(args.stop), seed=args.seed).validate()
