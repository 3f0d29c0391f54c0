#!/usr/bin/env python
"""Export a megatron_lite checkpoint to a stock transformers folder (no remote code).

    python tools/convert_to_hf.py --load CKPT --output HFDIR [--tag global_step30] [--dtype bfloat16]

Dense SwiGLU models become LlamaForCausalLM, MoE models MixtralForCausalLM. HFDIR gets config.json,
generation_config.json, model.safetensors and the tokenizer (with its chat template), so
`AutoModelForCausalLM.from_pretrained(HFDIR)` and `AutoTokenizer.from_pretrained(HFDIR)` load it.
Reads every checkpoint layout training writes: any ZeRO stage, expert-parallel `layer_*_expert_*` files.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import exit_on_user_error  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="megatron_lite checkpoint folder (holds model_config.json)")
    ap.add_argument("--output", required=True, help="HF folder to write (created if missing)")
    ap.add_argument("--tag", default=None, help="checkpoint tag to export (default: the one in CKPT/latest)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="dtype of the saved weights (default: as stored in the checkpoint)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error("convert_to_hf"):
        from megatron_lite.checkpoint.load import load_full_state_dict
        from megatron_lite.inference.loading import load_tokenizer_for, parse_dtype
        from megatron_lite.convert.hf import check_exportable, save_hf_folder

        config, sd = load_full_state_dict(args.load, args.tag)
        check_exportable(config)
        tokenizer = load_tokenizer_for(args.load)
        if tokenizer is None:
            print(f"convert_to_hf: warning: no tokenizer in {args.load}/tokenizer; HF folder has weights only",
                  file=sys.stderr)
        save_hf_folder(args.output, config, sd, tokenizer, parse_dtype(args.dtype))
        kind = "MixtralForCausalLM" if config.is_moe else "LlamaForCausalLM"
        print(f"wrote {kind} ({config.num_params() / 1e6:.2f}M params) to {args.output}")


if __name__ == "__main__":
    main()
