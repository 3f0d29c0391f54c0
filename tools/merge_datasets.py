#!/usr/bin/env python
"""Concatenate Megatron .bin/.idx datasets into one.

    python tools/merge_datasets.py --input P1_text_document P2_text_document --output-prefix OUT_text_document
    python tools/merge_datasets.py --input DIR --output-prefix OUT_text_document   # every dataset in DIR

Documents keep their order: all of the first input, then the second, and so on. Inputs must have the
same token dtype (same tokenizer). Output is written under temporary names and renamed at the end.
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import UserError, exit_on_user_error  # noqa: E402


def expand_inputs(inputs):
    prefixes = []
    for x in inputs:
        if os.path.isdir(x):
            found = sorted(p[:-4] for p in glob.glob(os.path.join(x, "*.idx")))
            if not found:
                raise UserError(f"--input directory {x!r} contains no .idx files")
            prefixes += found
        else:
            prefixes.append(x[:-4] if x.endswith((".bin", ".idx")) else x)
    return prefixes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--input", nargs="+", required=True,
                   help="dataset prefixes (PREFIX for PREFIX.bin/.idx) or directories of them, in order")
    p.add_argument("--output-prefix", required=True, help="prefix of the merged PREFIX.bin/.idx")
    args = p.parse_args(argv)
    with exit_on_user_error("merge_datasets.py"):
        from tqdm import tqdm

        from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

        prefixes = expand_inputs(args.input)
        if os.path.abspath(args.output_prefix) in map(os.path.abspath, prefixes):
            raise UserError(f"--output-prefix {args.output_prefix!r} is also an input; choose a new name")
        first = IndexedDataset(prefixes[0])
        with IndexedDatasetBuilder(args.output_prefix, first.dtype) as b:
            for pre in tqdm(prefixes, desc="merge", unit="dataset", file=sys.stderr, disable=None):
                b.merge(pre)
            n = len(b)
        print(f"merge_datasets: {len(prefixes)} datasets, {n} documents -> {args.output_prefix}.{{bin,idx}}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
