#!/usr/bin/env python
"""Concatenate Megatron .bin/.idx datasets into one.

    python tools/merge_datasets.py --input P1_text_document P2_text_document --output-prefix OUT_text_document
    python tools/merge_datasets.py --input DIR --output-prefix OUT_text_document   # every dataset in DIR

Documents keep their order: all of the first input, then the second, and so on. Inputs must have the
same token dtype (same tokenizer). Output is written under temporary names and renamed at the end.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import exit_on_user_error  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--input", nargs="+", required=True,
                   help="dataset prefixes (PREFIX for PREFIX.bin/.idx) or directories of them, in order")
    p.add_argument("--output-prefix", required=True, help="prefix of the merged PREFIX.bin/.idx")
    args = p.parse_args(argv)
    with exit_on_user_error("merge_datasets.py"):
        from megatron_lite.data.indexed_dataset import merge_datasets

        merge_datasets(args.input, args.output_prefix)


if __name__ == "__main__":
    main()
