#!/usr/bin/env python
"""Convert a training checkpoint (any dp / tp / ep / ZeRO layout, dense or MoE) to a layout-free form.

    python tools/convert_checkpoint.py --load CKPT --output DIR [--to universal|fp32] [--tag global_step30]

--to universal (default): DIR becomes a checkpoint folder (DIR/latest, DIR/<tag>/, model_config.json,
    tokenizer/) whose tag holds, per parameter, the full fp32 master weight and AdamW's exp_avg / exp_avg_sq
    (fp32.safetensors, exp_avg.safetensors, exp_avg_sq.safetensors), plus step counts, the learning-rate
    schedule position, consumed samples and RNG (state.pt), listed with their sizes in universal.json.
    `launch/pretrain.py --load DIR` resumes it exactly at any layout; eval, generation and HF export read it.
--to fp32: DIR/model.safetensors with the full fp32 weights (tp 1, every expert under its global id: the
    keys of GPT(config).state_dict()), plus model_config.json and tokenizer/ (DeepSpeed's zero_to_fp32 for
    dense runs; this one also reads native DeepSpeed-MoE checkpoints).
Files are written under temporary names and renamed, so DIR never holds a partial conversion.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import exit_on_user_error  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint folder written by training (holds 'latest')")
    ap.add_argument("--output", required=True, help="folder to write (created if missing)")
    ap.add_argument("--to", choices=["universal", "fp32"], default="universal",
                    help="universal: layout-free training state that --load resumes at any layout; "
                         "fp32: full fp32 weights as one safetensors file")
    ap.add_argument("--tag", default=None, help="checkpoint tag to convert (default: the one CKPT/latest names)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error("convert_checkpoint"):
        from megatron_lite.checkpoint.universal import convert_to_fp32, convert_to_universal

        convert = convert_to_universal if args.to == "universal" else convert_to_fp32
        path = convert(args.load, args.output, args.tag)
        print(f"wrote {args.to} checkpoint {path}")


if __name__ == "__main__":
    main()
