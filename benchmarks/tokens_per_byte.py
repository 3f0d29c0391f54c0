#!/usr/bin/env python
"""Tokens per byte of held-out text for one or more tokenizer folders (the factor between nats/token and
bits per byte: bpb = nats/token * tokens/byte / ln 2, as launch/main_job.py reports it).

    python benchmarks/tokens_per_byte.py --corpus DIR TOKENIZER_DIR [TOKENIZER_DIR ...]

DIR is `python -m megatron_lite.data.corpus --output-dir DIR` output. Counts as main_job.py does: held-out
pretraining documents (+1 end-of-document token each), and the message texts of the held-out SFT set.
"""
from __future__ import annotations

import argparse
import json
import os


def count(tok, path: str, texts) -> tuple[int, int]:
    n_tok = n_bytes = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            for text, extra in texts(json.loads(line)):
                n_tok += len(tok(text)["input_ids"]) + extra
                n_bytes += len(text.encode("utf-8"))
    return n_tok, n_bytes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="folder written by megatron_lite.data.corpus")
    p.add_argument("tokenizers", nargs="+", help="tokenizer folders to compare")
    args = p.parse_args(argv)
    from megatron_lite.data.tokenizer import load_tokenizer

    for d in args.tokenizers:
        tok = load_tokenizer(d)
        pre = count(tok, os.path.join(args.corpus, "pretrain_valid.jsonl"), lambda o: [(o["text"], 1)])
        sft = count(tok, os.path.join(args.corpus, "sft_valid.jsonl"),
                    lambda o: [(m["content"], 0) for m in o["conversations"]])
        print(f"{d}: held-out pretraining {pre[0]} tokens / {pre[1]} bytes = {pre[0] / pre[1]:.4f} tok/B; "
              f"held-out SFT messages {sft[0]} / {sft[1]} = {sft[0] / sft[1]:.4f} tok/B; "
              f"e.g. {tok.tokenize('x = 1234 + 56')}")


if __name__ == "__main__":
    main()
