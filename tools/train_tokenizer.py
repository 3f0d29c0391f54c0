#!/usr/bin/env python
"""Train a tokenizer on JSONL text and save it as a Hugging Face tokenizer directory.

    python tools/train_tokenizer.py --input F.jsonl [--json-keys text] --vocab-size N --output-dir DIR \\
        [--type bpe|sentencepiece]

DIR then loads with `transformers.AutoTokenizer.from_pretrained(DIR)`; it has the special tokens
<unk>, <|im_start|>, <|im_end|> (EOS/PAD/end-of-document) and a ChatML chat template.
The input is streamed line by line (bad lines are skipped), so its size is not limited by memory.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import UserError, exit_on_user_error  # noqa: E402


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
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)")
    args = p.parse_args(argv)

    with exit_on_user_error("train_tokenizer.py"):
        from tqdm import tqdm

        from megatron_lite.data.tokenizer import iter_jsonl_texts, train_tokenizer

        for f in args.input:
            if not os.path.isfile(f):
                raise UserError(f"--input {f!r} does not exist; pass a JSONL file with a "
                                f"{args.json_keys[0]!r} field per line")
        total = sum(os.path.getsize(f) for f in args.input)

        def texts():
            # Progress in bytes of text seen; the trainer consumes this generator lazily.
            with tqdm(total=total, unit="B", unit_scale=True, desc="reading", file=sys.stderr,
                      disable=None) as bar:
                n = 0
                for f in args.input:
                    for t in iter_jsonl_texts(f, args.json_keys):
                        n += 1
                        bar.update(len(t.encode("utf-8", "replace")))
                        yield t
                if n == 0:
                    raise UserError(f"no text found under --json-keys {' '.join(args.json_keys)} in "
                                    f"{' '.join(args.input)}")

        tok = train_tokenizer(texts(), args.vocab_size, args.output_dir, kind=args.type,
                              min_frequency=args.min_frequency)
        print(f"train_tokenizer: saved {args.type} tokenizer with {len(tok)} tokens to {args.output_dir}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
