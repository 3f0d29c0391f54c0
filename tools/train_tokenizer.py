#!/usr/bin/env python
"""Train a tokenizer on JSONL text and save it as a Hugging Face tokenizer directory.

    python tools/train_tokenizer.py --input F.jsonl [--json-keys text] --vocab-size N --output-dir DIR \\
        [--type bpe|sentencepiece] [--no-split-digits]

DIR then loads with `transformers.AutoTokenizer.from_pretrained(DIR)`; it has the special tokens
<unk>, <|im_start|>, <|im_end|> (EOS/PAD/end-of-document) and a ChatML chat template.
The input is streamed line by line (bad lines are skipped), so its size is not limited by memory.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import exit_on_user_error  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--input", required=True, nargs="+",
                   help="one or more JSONL files (.jsonl or .jsonl.gz) with a string field per line")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="fields holding the text (default: text); each is used as a training string")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="vocabulary size including special tokens (>= 259 for bpe, >= 260 for sentencepiece)")
    p.add_argument("--output-dir", required=True, help="directory to save the tokenizer into")
    p.add_argument("--type", choices=["bpe", "sentencepiece"], default="bpe",
                   help="bpe: byte-level BPE (GPT-2 style, default); sentencepiece: Llama-style BPE "
                        "with metaspace and byte fallback")
    p.add_argument("--split-digits", action=argparse.BooleanOptionalAction, default=True,
                   help="make every digit 0-9 its own token, as Llama and DeepSeek do, so numbers are always "
                        "seen digit by digit (default: on; --no-split-digits lets BPE merge digit runs)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)")
    args = p.parse_args(argv)
    with exit_on_user_error("train_tokenizer.py"):
        from megatron_lite.data.tokenizer import train_tokenizer_from_jsonl

        train_tokenizer_from_jsonl(args.input, args.json_keys, args.vocab_size, args.output_dir, kind=args.type,
                                   min_frequency=args.min_frequency, split_digits=args.split_digits)


if __name__ == "__main__":
    main()
