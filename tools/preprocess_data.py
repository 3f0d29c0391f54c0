#!/usr/bin/env python
"""Tokenize JSONL (or any local file `datasets` can load) into Megatron .bin/.idx datasets.

    python tools/preprocess_data.py --input F.jsonl --output-prefix P --tokenizer DIR \\
        [--json-keys text] [--append-eod] [--workers N]

writes P_text_document.{bin,idx} (+ P_text_document.meta.json: max token id, counts, tokenizer).

With --chat, each line's `conversations` (ShareGPT `from`/`value` or OpenAI `role`/`content`) is
rendered with the ChatML template and two aligned datasets are written:
    P_text_document       token ids of the rendered conversation
    P_loss_mask_document  uint8, 1 on assistant content tokens and their <|im_end|>, else 0

With --preference (DPO data), each line is {"prompt": str | "conversations": [messages...],
"chosen": answer, "rejected": answer} (an answer: a string or one assistant message), and each answer is
rendered as the whole ChatML conversation with the answer as the last assistant turn:
    P_chosen_text_document, P_chosen_loss_mask_document      the chosen conversation, 1 on its answer
    P_rejected_text_document, P_rejected_loss_mask_document  the rejected one, likewise
launch/dpo.py --data-path P reads the four.

Bad lines (invalid UTF-8 or JSON, missing key, non-string or empty value, malformed conversation) are
skipped and counted; --strict stops at the first one instead, and so does --preference always (a row
that is not a usable pair, e.g. without `chosen` or `rejected`, is one error line naming file and line).
Output is written under temporary names and renamed only after the whole input succeeded, so a failed run
leaves no partial dataset.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import exit_on_user_error  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--input", required=True,
                   help="JSONL file (.jsonl/.json, optionally .gz), or a local parquet/arrow/csv file or "
                        "folder loadable by `datasets`")
    p.add_argument("--output-prefix", required=True,
                   help="output prefix P; writes P_{key}_document.{bin,idx,meta.json}")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (tools/train_tokenizer.py)")
    p.add_argument("--json-keys", nargs="+", default=None,
                   help="fields to tokenize, one dataset each (default: text; with --chat: conversations)")
    p.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token <|im_end|> to every document")
    p.add_argument("--chat", action="store_true",
                   help="SFT mode: render conversations with the chat template and also write "
                        "P_loss_mask_document aligned with P_text_document")
    p.add_argument("--preference", action="store_true",
                   help="DPO mode: read prompt/conversations + chosen + rejected and write "
                        "P_{chosen,rejected}_{text,loss_mask}_document (loss mask on each answer only)")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes (1 = in-process, using the tokenizer's own threads)")
    p.add_argument("--batch-size", type=int, default=1000, help="lines per encode batch / work item")
    p.add_argument("--batch-mb", type=float, default=1.0,
                   help="also end a batch after this many MB of input (bounds memory with long documents)")
    p.add_argument("--strict", action="store_true",
                   help="stop with an error at the first bad line (default: skip and count bad lines; "
                        "--preference always stops)")
    p.add_argument("--log-interval", type=int, default=10000,
                   help="when stderr is not a terminal (no progress bar), print a progress line every "
                        "N documents")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    with exit_on_user_error("preprocess_data.py"):
        from megatron_lite.data.preprocess import preprocess

        return preprocess(args.input, args.output_prefix, args.tokenizer, args.json_keys, args.append_eod,
                          args.chat, args.workers, args.batch_size, args.batch_mb, args.strict, args.log_interval,
                          args.preference)


if __name__ == "__main__":
    main()
