#!/usr/bin/env python
"""Import a stock transformers Llama (dense) or Mixtral (MoE) folder as a megatron_lite checkpoint.

    python tools/convert_from_hf.py --hf HFDIR --output CKPT

CKPT is written in the same DeepSpeed layout training saves (CKPT/latest, CKPT/<tag>/mp_rank_00_model_states.pt,
per-expert layer_*_expert_* files, model_config.json, tokenizer/), so it can be served, chatted with or
used as `launch/sft.py --pretrained CKPT`. Mixtral's router maps to our gate; our training-only router noise
starts at zero. Shapes our model cannot represent (mlp biases, rope scaling, sliding windows...) are refused.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import UserError, exit_on_user_error  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF folder with config.json and model.safetensors")
    ap.add_argument("--output", required=True, help="checkpoint folder to write")
    ap.add_argument("--tag", default="hf_import", help="checkpoint tag to write (default: hf_import)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error("convert_from_hf"):
        from megatron_lite.checkpoint.load import model_from_state_dict
        from megatron_lite.checkpoint.save import save_checkpoint_folder
        from megatron_lite.inference.loading import load_tokenizer_for
        from megatron_lite.convert.hf import load_hf_folder

        if not os.path.isfile(os.path.join(args.hf, "config.json")):
            raise UserError(f"{args.hf} has no config.json: not an HF model folder")
        config, sd = load_hf_folder(args.hf)
        model_from_state_dict(config, sd)  # refuses a state dict that does not fit the config before anything is written
        tokenizer = load_tokenizer_for(args.hf)
        if tokenizer is None:
            print(f"convert_from_hf: warning: no tokenizer in {args.hf}; checkpoint has no tokenizer/",
                  file=sys.stderr)
        save_checkpoint_folder(args.output, config, sd, tokenizer, tag=args.tag)
        print(f"wrote {'MoE' if config.is_moe else 'dense'} checkpoint ({config.num_params() / 1e6:.2f}M params) "
              f"to {args.output}")


if __name__ == "__main__":
    main()
