#!/usr/bin/env python
"""Serve a model over an OpenAI-compatible HTTP API.

    python tools/serve.py --load CKPT|HFDIR [--host 127.0.0.1] [--port 8000] [--no-compile]

On CPU the decode step is compiled once at start-up (a minute or more on 2 cores) before the port opens;
--no-compile serves at once, decoding eagerly (about half the speed).

Endpoints: POST /v1/chat/completions (stream: true for SSE), POST /v1/completions, GET /v1/models.
Try it:  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
Binds to 127.0.0.1 unless told otherwise: there is no authentication, so only use --host 0.0.0.0 on a
trusted network.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import exit_on_user_error  # noqa: E402
from megatron_lite.inference.cli import add_model_args, run_server  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, long_lived=True)
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
                    help="seconds a request may wait for the model before a 503 (a request body gets 30 s, "
                         "then 408)")
    ap.add_argument("--max-concurrency", type=int, default=64, help="open connections before 503s")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn log level")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    with exit_on_user_error("serve"):
        run_server(args)


if __name__ == "__main__":
    main()
