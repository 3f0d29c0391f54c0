#!/usr/bin/env python
"""Serve a model over an OpenAI-compatible HTTP API.

    python tools/serve.py --load CKPT|HFDIR [--host 127.0.0.1] [--port 8000]

Endpoints: POST /v1/chat/completions (stream: true for SSE), POST /v1/completions, GET /v1/models.
Try it:  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
Binds to 127.0.0.1 unless told otherwise: there is no authentication, so only use --host 0.0.0.0 on a
trusted network.
"""
import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import UserError, exit_on_user_error  # noqa: E402
from megatron_lite.inference.cli import add_model_args, load_for_inference  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    ap.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: folder name)")
    ap.add_argument("--max-tokens-limit", type=int, default=None,
                    help="largest max_tokens a request may ask for (default: the model's max_seq_len)")
    ap.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (413 above)")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="longest prompt accepted (default: the model's max_seq_len - 1; 400 above)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds a request may wait for the model before a 503 (bodies: 30 s, then 408)")
    ap.add_argument("--max-concurrency", type=int, default=64, help="open connections before 503s")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn log level")
    args = ap.parse_args(argv)
    with exit_on_user_error("serve"):
        from megatron_lite.inference.server import Limits, serve

        if not 0 < args.port < 65536:
            raise UserError(f"--port {args.port} is not a TCP port")
        with contextlib.redirect_stdout(sys.stderr):
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


if __name__ == "__main__":
    main()
